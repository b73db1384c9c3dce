"""Independent check of a PEFT export against the GGUF adapter it came from, with the Python
packages Hugging Face users have (`pip install safetensors numpy gguf`; no torch needed).

Usage: python export_peft_check.py ADAPTER.gguf PEFT_DIR N_HEAD N_HEAD_KV

Reads the GGUF adapter with gguf-py and the PEFT files with safetensors, then checks:
names, shapes and dtype; adapter_config.json (r, lora_alpha, target_modules, task/peft type);
lora_A equal to GGUF lora_a; lora_B equal to GGUF lora_b after applying convert_hf_to_gguf.py's
row permutation (numpy reshape/swapaxes) for llama q_proj (n_head) and k_proj (n_head_kv).
Prints "OK <n> tensors" on success; raises on any mismatch.
"""

import json
import sys

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import load_file

HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_to_gguf_permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def field_str(reader, key):
    f = reader.fields[key]
    return bytes(f.parts[f.data[0]]).decode()


def main():
    adapter, peft_dir, n_head, n_head_kv = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    reader = GGUFReader(adapter)
    arch = field_str(reader, "general.architecture")
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    gg = {}
    for t in reader.tensors:
        # gguf-py gives numpy arrays in numpy order: reversed ne.
        gg[t.name] = np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])

    st = load_file(f"{peft_dir}/adapter_model.safetensors")
    cfg = json.load(open(f"{peft_dir}/adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM", cfg
    assert float(cfg["lora_alpha"]) == alpha, (cfg["lora_alpha"], alpha)
    assert len(st) == len(gg), (len(st), len(gg))

    n = 0
    for name, a_gg in gg.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".weight.lora_a")]
        _, layer, stem = base.split(".")
        module = f"base_model.model.model.layers.{layer}.{HF[stem]}"
        b_gg = gg[base + ".weight.lora_b"]
        a_hf = st[f"{module}.lora_A.weight"].astype(np.float32)
        b_hf = st[f"{module}.lora_B.weight"].astype(np.float32)
        r = a_hf.shape[0]
        assert r == cfg["r"], (r, cfg["r"])
        assert a_hf.shape == a_gg.shape, (module, a_hf.shape, a_gg.shape)
        assert b_hf.shape == b_gg.shape, (module, b_hf.shape, b_gg.shape)
        short = HF[stem].split(".")[1]
        tm = cfg["target_modules"]
        assert (short in tm) if isinstance(tm, list) else (module.split("base_model.model.")[1] in tm), (short, tm)
        np.testing.assert_allclose(a_hf, a_gg, rtol=1e-3, atol=1e-6)
        if arch == "llama" and stem in ("attn_q", "attn_k"):
            heads = n_head if stem == "attn_q" else n_head_kv
            np.testing.assert_allclose(hf_to_gguf_permute(b_hf, heads), b_gg, rtol=1e-3, atol=1e-6)
            assert not np.allclose(b_hf, b_gg), f"{module}: lora_B was not un-permuted"
        else:
            np.testing.assert_allclose(b_hf, b_gg, rtol=1e-3, atol=1e-6)
        n += 2
    print(f"OK {n} tensors")


if __name__ == "__main__":
    main()
