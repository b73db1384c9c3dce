//! ggml tensor type ids, their block layouts, and the subset bfpo-lite can train on.
//!
//! The table mirrors `enum ggml_type` of ggml 0.26 (see `docs/gguf.md` §2). Every id
//! whose block size is known is listed so the reader can size tensors of *any* real model (for
//! `info`), while [`GgmlType`] names only the types our kernels and dequantizers support.

use std::fmt;

/// Facts about one ggml type id, supported or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block (1 for plain float/int types).
    pub block_elems: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

/// Every type id with a known block layout: (id, name, elements per block, bytes per block).
const TABLE: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
];

/// Layout facts for a type id, or `None` for ids that were removed from ggml or are unknown.
pub fn type_info(id: u32) -> Option<TypeInfo> {
    TABLE
        .iter()
        .find(|(i, ..)| *i == id)
        .map(|&(id, name, block_elems, block_bytes)| TypeInfo {
            id,
            name,
            block_elems,
            block_bytes,
        })
}

/// A human-readable name for any id (`"type 37 (removed from ggml)"` for ids without a layout).
pub fn type_name(id: u32) -> String {
    match type_info(id) {
        Some(t) => t.name.to_string(),
        None => match id {
            4 | 5 | 31 | 32 | 33 | 36 | 37 | 38 => format!("type {id} (removed from ggml)"),
            41 => "Q1_0".to_string(),
            42 => "Q2_0".to_string(),
            _ => format!("type {id} (unknown)"),
        },
    }
}

/// The weight types bfpo-lite dequantizes on the CPU and in its WGSL kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// All supported types, in ggml id order (BF16 last, as its id is 30).
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The supported type with this id, or `None` (use [`type_name`] to describe it).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Parse a user-facing name such as `q8_0`, `Q4_K` or `bf16` (case-insensitive).
    pub fn parse(s: &str) -> Option<GgmlType> {
        let up = s.to_ascii_uppercase();
        GgmlType::ALL.into_iter().find(|t| t.name() == up)
    }

    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block: 1 for float types, 32 for legacy quants, 256 for K-quants.
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes of one row of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub const fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            None
        } else {
            Some(n / self.block_elems() * self.block_bytes())
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Comma-separated list of supported names, for error messages.
    pub fn supported_list() -> String {
        GgmlType::ALL.map(|t| t.name()).join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_types_agree_with_the_table() {
        for t in GgmlType::ALL {
            let info = type_info(t.id()).expect("supported type in table");
            assert_eq!(info.name, t.name());
            assert_eq!(info.block_elems as usize, t.block_elems());
            assert_eq!(info.block_bytes as usize, t.block_bytes());
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::parse(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(GgmlType::from_id(10), None, "Q2_K is known but unsupported");
        assert_eq!(type_name(37), "type 37 (removed from ggml)");
        assert_eq!(GgmlType::Q6_K.row_bytes(512), Some(420));
        assert_eq!(GgmlType::Q4_K.row_bytes(64), None);
    }
}
