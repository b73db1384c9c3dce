#!/usr/bin/env python3
"""BFPO LoRA training on Hugging Face TRL + accelerate, continuing a bfpo-lite run.

Written by `bfpo-lite export-run --to trl`. Settings come from bfpo_config.json (the bfpo-lite
run's loss, LoRA, optimiser and truncation settings), data from data/*.jsonl (the run's pairs with
safety labels and bfpo-lite's own token ids, already chat-templated and truncated).

What it does, matching bfpo-lite (src/loss.rs, src/train/trainer.rs):
  * the loss of bfpo_loss.py on SUMMED response log-probs, target g/tau, same tau/b1/alpha;
  * every batch holds `pairs_per_step` safety pairs and `buffer_pairs_per_step` helpfulness-buffer
    pairs; its loss is mean(safety) + mean(buffer);
  * reference log-probs are computed once before training with the adapter off (TRL's
    precompute_ref_log_probs) and cached by `datasets`;
  * PEFT LoRA on the same modules, layers, rank, alpha and dropout; dropout in the base model off;
  * AdamW with the run's learning rate, schedule, warmup, weight decay, betas, epsilon and
    gradient clipping; gradient accumulation as in the run.

Launch (see README.md): `accelerate launch --config_file accelerate/single_gpu.yaml train.py`.
At the end the adapter is in OUTPUT_DIR/adapter (adapter_model.safetensors, adapter_config.json,
bfpo_run.json); `bfpo-lite import-peft OUTPUT_DIR/adapter --model M.gguf --out adapter.gguf`
brings it back.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import concatenate_datasets, load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from bfpo_loss import LossSpec, batch_loss, truncate_pair  # noqa: E402

# Batch keys this script adds; they never reach the model.
LABEL_KEYS = ("is_chosen_safe", "is_rejected_safe", "is_buffer")
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *LABEL_KEYS}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(HERE, "bfpo_config.json"))
    p.add_argument("--model", help="Hugging Face model id or local path (default: hf_model of the config)")
    p.add_argument("--output-dir", default=os.path.join(HERE, "output"))
    p.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    p.add_argument("--max-steps", type=int, help="override the run's max_steps (0 = epochs)")
    p.add_argument("--epochs", type=float, help="override the run's epochs")
    p.add_argument("--tokenize", choices=("bfpo", "hf"), default="bfpo",
                   help="bfpo: use the token ids bfpo-lite wrote (identical sequences; the HF model must "
                        "have the GGUF's vocabulary). hf: re-tokenize the text with the HF tokenizer's chat "
                        "template, then truncate as bfpo-lite does (for data you added or edited).")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and compute (auto: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with a GPU, off on CPU")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: the run's save_every)")
    p.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: the run's eval_every)")
    p.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the last (or the given) checkpoint in OUTPUT_DIR")
    return p.parse_args()


class BfpoCollator(DataCollatorForPreference):
    """TRL's preference collator plus the safety labels and the buffer flag of each pair."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        for k in LABEL_KEYS:
            out[k] = torch.tensor([float(e.get(k, 0.0)) for e in examples], dtype=torch.float64)
        return out


class BufferMixSampler(torch.utils.data.Sampler):
    """Yields, for each batch, `n_safety` shuffled safety indices then `n_buffer` buffer indices.

    With batch size n_safety + n_buffer every batch holds exactly that mix (the epoch's last one
    may hold fewer safety pairs). The buffer cycles across epochs, as bfpo-lite's does.
    """

    def __init__(self, is_buffer, n_safety, n_buffer, seed):
        self.safety = [i for i, b in enumerate(is_buffer) if not b]
        self.buffer = [i for i, b in enumerate(is_buffer) if b]
        self.n_safety, self.n_buffer = n_safety, (n_buffer if self.buffer else 0)
        self.seed = seed
        self.epoch = 0
        self.buffer_pos = 0
        self.buffer_order = []
        self.buffer_epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _next_buffer(self):
        if self.buffer_pos >= len(self.buffer_order):
            g = torch.Generator().manual_seed((self.seed ^ 0xB0FF) + self.buffer_epoch)
            self.buffer_order = [self.buffer[i] for i in torch.randperm(len(self.buffer), generator=g).tolist()]
            self.buffer_epoch += 1
            self.buffer_pos = 0
        self.buffer_pos += 1
        return self.buffer_order[self.buffer_pos - 1]

    def __len__(self):
        batches = math.ceil(len(self.safety) / self.n_safety)
        return len(self.safety) + batches * self.n_buffer

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [self.safety[i] for i in torch.randperm(len(self.safety), generator=g).tolist()]
        self.epoch += 1
        for start in range(0, len(order), self.n_safety):
            yield from order[start:start + self.n_safety]
            for _ in range(self.n_buffer):
                yield self._next_buffer()


class BfpoTrainer(DPOTrainer):
    """TRL's DPOTrainer with bfpo-lite's data handling and loss.

    Overrides: `_prepare_dataset` (keeps bfpo-lite's token ids, or re-tokenizes and truncates as
    bfpo-lite does), `_set_signature_columns_if_needed` (keeps the label columns),
    `_get_train_sampler` (safety + buffer mix), `compute_ref_log_probs` (drops the label keys) and
    `_compute_loss` (the BFPO loss of bfpo_loss.py; TRL's metric names).
    """

    def __init__(self, *a, bfpo_spec=None, bfpo_settings=None, **kw):
        self.bfpo_spec = bfpo_spec
        self.bfpo_settings = bfpo_settings
        super().__init__(*a, **kw)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return check_ids(dataset, dataset_name, None)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        t = self.bfpo_settings["truncation"]

        def trunc(ex):
            p, c, r = truncate_pair(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"],
                                    t["max_length"], t["max_prompt_length"],
                                    t.get("keep_prompt_prefix", 0), t.get("response_budget", "trl"))
            return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}

        return dataset.map(trunc, desc=f"Truncating {dataset_name} as bfpo-lite does")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for k in LABEL_KEYS:
            if k not in self._signature_columns:
                self._signature_columns.append(k)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        tr = self.bfpo_settings["train"]
        return BufferMixSampler(ds["is_buffer"], tr["pairs_per_step"], tr["buffer_pairs_per_step"], tr["seed"])

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k not in LABEL_KEYS}
        return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        seq_len = completion_mask.size(1) - 1
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        # Summed over the response tokens (masked positions are 0), then float64 as bfpo-lite.
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1).double()
        chosen, rejected = logps.chunk(2, dim=0)
        ref_chosen = inputs["ref_chosen_logps"].double().to(chosen.device)
        ref_rejected = inputs["ref_rejected_logps"].double().to(chosen.device)
        cs, rs, buf = (inputs[k].double().to(chosen.device) for k in LABEL_KEYS)
        loss, per_pair, delta = batch_loss(self.bfpo_spec, chosen, rejected, ref_chosen, ref_rejected,
                                           cs, rs, buf, logsigmoid=F.logsigmoid)
        loss = loss.float()

        # Metrics (TRL names) over the safety pairs of the batch, as bfpo-lite logs them.
        with torch.no_grad():
            s = self.bfpo_spec.reward_scale()
            safety = buf == 0
            rc = s * (chosen.detach() - ref_chosen)
            rr = s * (rejected.detach() - ref_rejected)
            m = self._metrics[mode]
            g = self.accelerator.gather

            all_safety = g(safety)

            def add(name, x):
                x = g(x)[all_safety]
                if x.numel():
                    m[name].append(x.float().mean().item())

            add("rewards/chosen", rc)
            add("rewards/rejected", rr)
            add("rewards/margins", rc - rr)
            add("rewards/accuracies", (rc > rr).double())
            add("logps/chosen", chosen.detach())
            add("logps/rejected", rejected.detach())
            add("bfpo/delta", delta.detach())
            add("bfpo/pair_loss", per_pair.detach())
            if mode == "train":
                n_tok = g(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += n_tok
                m["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


def check_ids(dataset, name, vocab):
    """bfpo-lite's token ids: every row has a prompt and two responses, ids below the vocab size."""
    for i, ex in enumerate(dataset):
        if not ex["prompt_ids"] or not ex["chosen_ids"] or not ex["rejected_ids"]:
            raise ValueError(f"{name} row {i + 1}: empty prompt or response ids")
        if vocab is not None:
            top = max(max(ex["prompt_ids"]), max(ex["chosen_ids"]), max(ex["rejected_ids"]))
            if top >= vocab:
                raise ValueError(
                    f"{name} row {i + 1} ({ex.get('origin', '?')}): token id {top} >= the model's vocabulary "
                    f"{vocab}; the HF model is not the one the GGUF was converted from (use --tokenize hf)")
    return dataset


def load_rows(path, mode, is_buffer):
    ds = load_dataset("json", data_files=path, split="train")
    if mode == "hf":
        ds = ds.remove_columns([c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in ds.column_names])
        # TRL's conversational format: the responses as assistant messages.
        ds = ds.map(lambda ex: {"chosen": [{"role": "assistant", "content": ex["chosen"]}],
                                "rejected": [{"role": "assistant", "content": ex["rejected"]}]})
    ds = ds.map(lambda ex: {"is_chosen_safe": float(ex["is_chosen_safe"]),
                            "is_rejected_safe": float(ex["is_rejected_safe"]),
                            "is_buffer": float(is_buffer)})
    return ds


def main():
    args = parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    spec = LossSpec.from_json(cfg["loss"])
    tr, lo = cfg["train"], cfg["lora"]
    model_id = args.model or cfg["hf_model"]

    files = {k: os.path.join(args.data_dir, f"{k}.jsonl") for k in ("train", "buffer", "eval")}
    train = load_rows(files["train"], args.tokenize, 0)
    if os.path.exists(files["buffer"]) and os.path.getsize(files["buffer"]) > 0:
        train = concatenate_datasets([train, load_rows(files["buffer"], args.tokenize, 1)])
    evalset = None
    if os.path.exists(files["eval"]) and os.path.getsize(files["eval"]) > 0:
        evalset = load_rows(files["eval"], args.tokenize, 0)

    use_cuda = torch.cuda.is_available()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if use_cuda and torch.cuda.is_bf16_supported() else "float32"
    gc = args.gradient_checkpointing if args.gradient_checkpointing is not None else use_cuda

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    n_buffer = tr["buffer_pairs_per_step"] if (train["is_buffer"] and max(train["is_buffer"]) > 0) else 0
    max_steps = args.max_steps if args.max_steps is not None else tr["max_steps"]
    epochs = args.epochs if args.epochs is not None else tr["epochs"]
    warmup = tr["warmup_ratio"]
    save_steps = args.save_steps or tr.get("save_every") or 500
    eval_steps = args.eval_steps or tr.get("eval_every") or None

    config = DPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=tr["pairs_per_step"] + n_buffer,
        per_device_eval_batch_size=max(tr["pairs_per_step"], 1),
        gradient_accumulation_steps=tr["gradient_accumulation_steps"],
        learning_rate=tr["learning_rate"],
        lr_scheduler_type=tr["lr_scheduler_type"],
        warmup_steps=warmup if warmup < 1 else 0.999999,
        weight_decay=tr["weight_decay"],
        adam_beta1=tr["adam_beta1"],
        adam_beta2=tr["adam_beta2"],
        adam_epsilon=tr["adam_epsilon"],
        max_grad_norm=tr["max_grad_norm"],
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps and max_steps > 0 else -1,
        seed=tr["seed"],
        # Sequences are already truncated as bfpo-lite does; the collator must not cut them again.
        max_length=None,
        precompute_ref_log_probs=True,
        loss_type=["sigmoid"],  # unused: _compute_loss is BFPO's
        beta=spec.reward_scale(),
        disable_dropout=True,
        gradient_checkpointing=gc,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        model_init_kwargs={"dtype": getattr(torch, dtype)},
        logging_steps=args.logging_steps,
        save_steps=save_steps,
        eval_strategy="steps" if (evalset is not None and eval_steps) else "no",
        eval_steps=eval_steps,
        report_to=args.report_to,
        remove_unused_columns=True,
        dataloader_drop_last=False,
    )
    peft_config = LoraConfig(
        r=lo["r"],
        lora_alpha=lo["lora_alpha"],
        lora_dropout=lo["lora_dropout"],
        target_modules=lo["target_modules"],
        layers_to_transform=lo["layers_to_transform"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    collator = BfpoCollator(pad_token_id=tokenizer.pad_token_id, max_length=None)
    trainer = BfpoTrainer(
        model=model_id,
        args=config,
        train_dataset=train,
        eval_dataset=evalset,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=peft_config,
        bfpo_spec=spec,
        bfpo_settings=cfg,
    )
    if args.tokenize == "bfpo":
        vocab = trainer.model.config.get_text_config().vocab_size
        check_ids(trainer.train_dataset, "train", vocab)
    result = trainer.train(resume_from_checkpoint=args.resume)

    out = os.path.join(args.output_dir, "adapter")
    trainer.save_model(out)
    if trainer.accelerator.is_main_process:
        loss_params = {k: v for k, v in cfg["loss"].items() if k != "kind"}
        info = {
            "loss": spec.kind,
            "loss_params": loss_params,
            "train_params": {
                "learning_rate": tr["learning_rate"],
                "rank": lo["r"],
                "pairs_per_step": tr["pairs_per_step"],
                "grad_accum": tr["gradient_accumulation_steps"],
                "seed": tr["seed"],
                "world_size": trainer.accelerator.num_processes,
            },
            "steps": int(result.global_step),
            "base_model_name": model_id,
            "datasets": cfg.get("source", {}).get("datasets", []),
        }
        with open(os.path.join(out, "bfpo_run.json"), "w") as f:
            json.dump(info, f, indent=2)
        print(f"adapter: {out} ({result.global_step} steps, final loss {result.training_loss:.6g})")


if __name__ == "__main__":
    main()
