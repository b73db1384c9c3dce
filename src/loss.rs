//! Preference losses (BFPO, IPO, DPO) as pure functions of per-pair scalars. (Pending.)
