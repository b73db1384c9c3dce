// Per-type decoding of GGUF weight blocks, in registers, from raw block bytes.
//
// Contract for a kernel that includes this file:
//   * it declares the weight buffer as `var<storage, read> wq: array<u32>;` (any binding): the
//     raw GGUF bytes of whole rows, back to back, zero-padded to a multiple of 4 bytes;
//   * `base` is the byte offset of a row start inside `wq` (always even: every block size is);
//   * `g` is an 8-element group index within that row: `dq8_<TYPE>(base, g)` returns elements
//     8g .. 8g+7 of the row as two vec4 (`lo` = 8g..8g+3, `hi` = 8g+4..8g+7).
//   Rows therefore need n_in % 8 == 0 (true for every quant type, and checked by the launchers).
// Pick the type at pipeline creation with a define, e.g. `dq8_${WTYPE}(base, g)`; the functions of
// the other types are never called and cost nothing at run time.
//
// Nothing here needs SHADER_F16: halves are read with `unpack2x16float`. Q4_0, Q5_0, Q8_0 and
// Q6_K blocks are 18/22/34/210 bytes, so their fields are only 2-byte aligned: the `rd*` helpers
// read 2-aligned byte offsets out of u32 words. Layouts: docs/gguf.md §2.

struct W8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// 16 bits at even byte offset o.
fn rd16(o: u32) -> u32 {
    return (wq[o >> 2u] >> ((o & 2u) * 8u)) & 0xFFFFu;
}

// The f16 at even byte offset o, as f32.
fn rdf16(o: u32) -> f32 {
    return unpack2x16float(rd16(o)).x;
}

// 32 bits at even byte offset o (little-endian).
fn rd32(o: u32) -> u32 {
    let i = o >> 2u;
    let w0 = wq[i];
    if ((o & 2u) == 0u) {
        return w0;
    }
    return (w0 >> 16u) | (wq[i + 1u] << 16u);
}

// 64 bits at even byte offset o, as two little-endian words.
fn rd64(o: u32) -> vec2<u32> {
    let i = o >> 2u;
    let w0 = wq[i];
    let w1 = wq[i + 1u];
    if ((o & 2u) == 0u) {
        return vec2<u32>(w0, w1);
    }
    let w2 = wq[i + 2u];
    return vec2<u32>((w0 >> 16u) | (w1 << 16u), (w1 >> 16u) | (w2 << 16u));
}

// The four bytes of w as signed integers, as f32.
fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(w)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// The four bytes of w as unsigned integers.
fn u8x4(w: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xFFu);
}

// The nibble at bit `shift` (0 or 4) of each byte of w.
fn nib4(w: u32, shift: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> (vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(shift))) & vec4<u32>(0xFu);
}

// Bit `b` (0..7) of each byte of w.
fn bit4(w: u32, b: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> (vec4<u32>(0u, 8u, 16u, 24u) + vec4<u32>(b))) & vec4<u32>(1u);
}

// ---- float types --------------------------------------------------------------------------

fn dq8_F32(base: u32, g: u32) -> W8 {
    let i = (base >> 2u) + 8u * g;
    return W8(
        vec4<f32>(bitcast<f32>(wq[i]), bitcast<f32>(wq[i + 1u]), bitcast<f32>(wq[i + 2u]), bitcast<f32>(wq[i + 3u])),
        vec4<f32>(bitcast<f32>(wq[i + 4u]), bitcast<f32>(wq[i + 5u]), bitcast<f32>(wq[i + 6u]), bitcast<f32>(wq[i + 7u])),
    );
}

fn dq8_F16(base: u32, g: u32) -> W8 {
    let i = (base >> 2u) + 4u * g;
    return W8(
        vec4<f32>(unpack2x16float(wq[i]), unpack2x16float(wq[i + 1u])),
        vec4<f32>(unpack2x16float(wq[i + 2u]), unpack2x16float(wq[i + 3u])),
    );
}

fn bf16x2(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xFFFF0000u));
}

fn dq8_BF16(base: u32, g: u32) -> W8 {
    let i = (base >> 2u) + 4u * g;
    return W8(
        vec4<f32>(bf16x2(wq[i]), bf16x2(wq[i + 1u])),
        vec4<f32>(bf16x2(wq[i + 2u]), bf16x2(wq[i + 3u])),
    );
}

// ---- legacy 32-element blocks (j = which 8-element group of the block) --------------------

// Q8_0 (34 B): half d; i8 qs[32].  y[e] = qs[e]·d.
fn dq8_Q8_0(base: u32, g: u32) -> W8 {
    let o = base + 34u * (g >> 2u);
    let j = g & 3u;
    let d = rdf16(o);
    let q = rd64(o + 2u + 8u * j);
    return W8(d * i8x4(q.x), d * i8x4(q.y));
}

// Q4_0 (18 B): half d; u8 qs[16].  y[e] = (qs[e]&0xF − 8)·d, y[e+16] = (qs[e]>>4 − 8)·d.
fn dq8_Q4_0(base: u32, g: u32) -> W8 {
    let o = base + 18u * (g >> 2u);
    let j = g & 3u;
    let d = rdf16(o);
    let q = rd64(o + 2u + 8u * (j & 1u));
    let s = 4u * (j >> 1u);
    return W8(
        d * (vec4<f32>(nib4(q.x, s)) - 8.0),
        d * (vec4<f32>(nib4(q.y, s)) - 8.0),
    );
}

// Q4_1 (20 B): half d; half m; u8 qs[16].  y[e] = (qs[e]&0xF)·d + m, y[e+16] = (qs[e]>>4)·d + m.
fn dq8_Q4_1(base: u32, g: u32) -> W8 {
    let i = (base + 20u * (g >> 2u)) >> 2u;
    let j = g & 3u;
    let dm = unpack2x16float(wq[i]);
    let k = i + 1u + 2u * (j & 1u);
    let s = 4u * (j >> 1u);
    return W8(
        dm.x * vec4<f32>(nib4(wq[k], s)) + dm.y,
        dm.x * vec4<f32>(nib4(wq[k + 1u], s)) + dm.y,
    );
}

// Q5_0 (22 B): half d; u8 qh[4]; u8 qs[16].  Element e of the block has its fifth bit at bit e
// of qh (LE u32) and its low four bits in nibble (e / 16) of qs[e % 16]; y = (q − 16)·d.
fn dq8_Q5_0(base: u32, g: u32) -> W8 {
    let o = base + 22u * (g >> 2u);
    let j = g & 3u;
    let d = rdf16(o);
    let qh = rd32(o + 2u) >> (8u * j);
    let q = rd64(o + 6u + 8u * (j & 1u));
    let s = 4u * (j >> 1u);
    let hlo = ((vec4<u32>(qh) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) << vec4<u32>(4u);
    let hhi = ((vec4<u32>(qh) >> vec4<u32>(4u, 5u, 6u, 7u)) & vec4<u32>(1u)) << vec4<u32>(4u);
    return W8(
        d * (vec4<f32>(nib4(q.x, s) | hlo) - 16.0),
        d * (vec4<f32>(nib4(q.y, s) | hhi) - 16.0),
    );
}

// Q5_1 (24 B): half d; half m; u8 qh[4]; u8 qs[16].  As Q5_0 without the −16, then ·d + m.
fn dq8_Q5_1(base: u32, g: u32) -> W8 {
    let i = (base + 24u * (g >> 2u)) >> 2u;
    let j = g & 3u;
    let dm = unpack2x16float(wq[i]);
    let qh = wq[i + 1u] >> (8u * j);
    let k = i + 2u + 2u * (j & 1u);
    let s = 4u * (j >> 1u);
    let hlo = ((vec4<u32>(qh) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) << vec4<u32>(4u);
    let hhi = ((vec4<u32>(qh) >> vec4<u32>(4u, 5u, 6u, 7u)) & vec4<u32>(1u)) << vec4<u32>(4u);
    return W8(
        dm.x * vec4<f32>(nib4(wq[k], s) | hlo) + dm.y,
        dm.x * vec4<f32>(nib4(wq[k + 1u], s) | hhi) + dm.y,
    );
}

// ---- K-quants: 256-element super-blocks of 8 sub-blocks of 32 ------------------------------

// Byte k (0..11) of the 12 packed scale bytes held in words s0, s1, s2.
fn kbyte(s0: u32, s1: u32, s2: u32, k: u32) -> u32 {
    let w = select(select(s2, s1, k < 8u), s0, k < 4u);
    return (w >> (8u * (k & 3u))) & 0xFFu;
}

// get_scale_min_k4: the 6-bit (scale, min) of sub-block s (0..7), as f32.
fn kscale_min(s0: u32, s1: u32, s2: u32, s: u32) -> vec2<f32> {
    if (s < 4u) {
        return vec2<f32>(f32(kbyte(s0, s1, s2, s) & 63u), f32(kbyte(s0, s1, s2, s + 4u) & 63u));
    }
    let a = kbyte(s0, s1, s2, s + 4u);
    let sc = (a & 0xFu) | ((kbyte(s0, s1, s2, s - 4u) >> 6u) << 4u);
    let m = (a >> 4u) | ((kbyte(s0, s1, s2, s) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Q4_K (144 B): half d; half dmin; u8 scales[12]; u8 qs[128].  Sub-block s = 2c + h (c = 64-chunk,
// h = nibble): y[32s + l] = d·sc_s·(qs[32c + l] >> 4h & 0xF) − dmin·m_s.
fn dq8_Q4_K(base: u32, g: u32) -> W8 {
    let i = (base + 144u * (g >> 5u)) >> 2u;
    let gg = g & 31u;
    let s = gg >> 2u;
    let l = 8u * (gg & 3u);
    let dm = unpack2x16float(wq[i]);
    let sm = kscale_min(wq[i + 1u], wq[i + 2u], wq[i + 3u], s);
    let a = dm.x * sm.x;
    let b = dm.y * sm.y;
    let k = i + 4u + 8u * (s >> 1u) + (l >> 2u);
    let sh = 4u * (s & 1u);
    return W8(
        a * vec4<f32>(nib4(wq[k], sh)) - b,
        a * vec4<f32>(nib4(wq[k + 1u], sh)) - b,
    );
}

// Q5_K (176 B): half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128].  As Q4_K plus a fifth
// bit: bit s of qh[l] (s = sub-block index).
fn dq8_Q5_K(base: u32, g: u32) -> W8 {
    let i = (base + 176u * (g >> 5u)) >> 2u;
    let gg = g & 31u;
    let s = gg >> 2u;
    let l = 8u * (gg & 3u);
    let dm = unpack2x16float(wq[i]);
    let sm = kscale_min(wq[i + 1u], wq[i + 2u], wq[i + 3u], s);
    let a = dm.x * sm.x;
    let b = dm.y * sm.y;
    let kh = i + 4u + (l >> 2u);
    let k = i + 12u + 8u * (s >> 1u) + (l >> 2u);
    let sh = 4u * (s & 1u);
    return W8(
        a * vec4<f32>(nib4(wq[k], sh) | (bit4(wq[kh], s) << vec4<u32>(4u))) - b,
        a * vec4<f32>(nib4(wq[k + 1u], sh) | (bit4(wq[kh + 1u], s) << vec4<u32>(4u))) - b,
    );
}

// Q6_K (210 B): u8 ql[128]; u8 qh[64]; i8 scales[16]; half d.  Half n (128 elements), quarter
// q (32), l < 32: low bits = nibble (q / 2) of ql[64n + 32(q % 2) + l], high bits = bits 2q..2q+1
// of qh[32n + l], scale = scales[8n + l/16 + 2q]; y = d·scale·(q6 − 32).
fn dq8_Q6_K(base: u32, g: u32) -> W8 {
    let o = base + 210u * (g >> 5u);
    let gg = g & 31u;
    let n = gg >> 4u;
    let q = (gg >> 2u) & 3u;
    let l = 8u * (gg & 3u);
    let ql = rd64(o + 64u * n + 32u * (q & 1u) + l);
    let qh = rd64(o + 128u + 32u * n + l);
    let sc_byte = (rd16(o + 192u + ((8u * n + (l >> 4u) + 2u * q) & ~1u)) >> (8u * (((l >> 4u) + 2u * q) & 1u))) & 0xFFu;
    let sc = f32((bitcast<i32>(sc_byte) << 24u) >> 24u);
    let a = rdf16(o + 208u) * sc;
    let sh = 4u * (q >> 1u);
    let hs = 2u * q;
    let h0 = (u8x4(qh.x) >> vec4<u32>(hs)) & vec4<u32>(3u);
    let h1 = (u8x4(qh.y) >> vec4<u32>(hs)) & vec4<u32>(3u);
    return W8(
        a * (vec4<f32>(nib4(ql.x, sh) | (h0 << vec4<u32>(4u))) - 32.0),
        a * (vec4<f32>(nib4(ql.y, sh) | (h1 << vec4<u32>(4u))) - 32.0),
    );
}
