"""torchtitan: a TOML job config for the 0.2 line (``--job.config_file FILE``), headed by
the same settings as command-line overrides for the 0.3 line, which reads no TOML."""

from __future__ import annotations

from typing import Any

from autotune.config import PADDED_POLICIES, RunConfig
from autotune.export._base import Exporter, Mapping
from autotune.export._facts import Facts, RowBatch, global_batch_note, rows_of_tokens

__all__ = ["TORCHTITAN_VERSION", "Torchtitan", "toml_text", "v03_overrides"]

# The line whose JobConfig the TOML is written for and checked against.
TORCHTITAN_VERSION = "0.2"

# torchtitan's registered llama3 flavors with the same shapes as autotune's presets.
_FLAVORS = {"llama3-8b": ("llama3", "8B"), "llama3-70b": ("llama3", "70B")}
_CUSTOM_FLAVOR = "autotune"
# Sections whose fields keep their 0.2 names in 0.3.0 (its optimizer is a list of parameter
# groups and its activation checkpointing a subcommand, both set in a config function).
_V03_SECTIONS = ("lr_scheduler", "training", "parallelism", "debug")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == float("inf") else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """TOML of flat tables of scalars and lists: all a job config needs, without a writer
    package."""
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def v03_overrides(sections: dict[str, dict[str, Any]]) -> list[str]:
    """The settings as ``--section.key value`` overrides, for the sections whose fields the
    0.3 line kept under the same names."""
    return [f"--{sec}.{k} {_toml_value(v)}" for sec, table in sections.items()
            if sec in _V03_SECTIONS for k, v in table.items()]


class Torchtitan(Exporter):
    """Parallel degrees (FSDP2 shard or replicate, as autotune applies them), activation
    checkpointing, batch in rows of ``seq_len`` tokens, mixed precision, AdamW with warm-up.
    torchtitan's loader concatenates documents into ``seq_len`` windows."""

    name = "torchtitan"
    suffix = ".toml"
    leftover = "the model flavor or the training script"

    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        rows = self._rows(rc, facts, m)
        training = {"local_batch_size": rows.micro, "global_batch_size": rows.global_rows,
                    "seq_len": rows.row_len, "max_norm": rc.optimizer.grad_clip or float("inf"),
                    "mixed_precision_param": "bfloat16" if rc.precision.dtype == "bf16"
                    else "float32", "mixed_precision_reduce": "float32"}
        m.carry("precision.dtype", "optimizer.grad_clip", "seed")
        o = rc.optimizer
        sections = {
            "job": {"description": f"autotune {rc.label()}"},
            "model": self._model(rc),
            "optimizer": {"name": "AdamW", "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2,
                          "eps": 1e-8, "weight_decay": o.weight_decay},
            "lr_scheduler": self._lr_scheduler(o, m),
            "training": training,
            "parallelism": self._parallelism(rc, m) | self._pipeline(rc, rows, training, m),
            "activation_checkpoint": self._checkpoint(rc, facts, m),
            "debug": {"seed": rc.seed},
        }
        if rc.compile == "blocks":  # torchtitan compiles each transformer block too
            sections["compile"] = {"enable": True, "components": ["model"]}
            m.carry("compile")
        m.carry("optimizer.lr", "optimizer.beta1", "optimizer.beta2", "optimizer.weight_decay",
                "optimizer.warmup_steps", "optimizer.lr_schedule", "optimizer.decay_steps",
                "optimizer.min_lr_ratio")
        head = [f"# torchtitan {TORCHTITAN_VERSION}.x job config: --job.config_file FILE.",
                "# torchtitan 0.3 reads no TOML: give its --module/--config these overrides "
                "(it sets the optimizer and activation checkpointing in the config function):",
                f"# {' '.join(v03_overrides(sections))}"]
        if sections["model"]["flavor"] == _CUSTOM_FLAVOR:
            d = facts.dims
            head.append(f"# No registered flavor has this model's shape: register llama3 flavor "
                        f"{_CUSTOM_FLAVOR!r} with dim={d.hidden}, n_layers={d.layers}, "
                        f"n_heads={d.heads}, n_kv_heads={d.kv_heads}, vocab_size={d.vocab}, "
                        f"FFN width {d.ffn}, rope_theta={d.rope_theta:g}.")
        return "\n".join(head) + "\n\n" + toml_text(sections)

    @staticmethod
    def _lr_scheduler(o: Any, m: Mapping) -> dict[str, Any]:
        if o.lr_schedule == "constant":
            # No decay phase: autotune holds the rate constant after the warm-up.
            return {"warmup_steps": o.warmup_steps, "decay_ratio": 0.0}
        # No decay_ratio: the decay starts at the end of the warm-up, as autotune's does;
        # without total_steps it spans training.steps, as an unset decay_steps does.
        out = {"warmup_steps": o.warmup_steps, "decay_type": "cosine",
               "min_lr_factor": o.min_lr_ratio}
        if o.decay_steps is not None:
            out["total_steps"] = o.decay_steps
        return out

    @staticmethod
    def _model(rc: RunConfig) -> dict[str, Any]:
        name, flavor = _FLAVORS.get(rc.workload.model.preset or "", ("llama3", _CUSTOM_FLAVOR))
        return {"name": name, "flavor": flavor}

    @staticmethod
    def _rows(rc: RunConfig, facts: Facts, m: Mapping) -> RowBatch:
        s = rc.schedule
        doc_mask = ("attention stays inside each document with the flavor's "
                    "attn_mask_type='block_causal' (flex attention)")
        if s.policy in PADDED_POLICIES:
            rows = rows_of_tokens(rc, row_len=facts.seq_len, micro=s.micro_batch_size)
            m.carry("schedule.micro_batch_size")
            m.substitute("schedule.policy", f"windows of {facts.seq_len} concatenated tokens",
                         f"torchtitan's loader concatenates documents and never pads; the "
                         f"window is the longest sequence; {doc_mask}")
        else:
            rows = rows_of_tokens(rc, row_len=s.micro_batch_tokens)
            m.substitute("schedule.micro_batch_tokens", f"local_batch_size 1 x seq_len "
                         f"{s.micro_batch_tokens}", "one window of micro_batch_tokens "
                         "concatenated tokens per micro-batch")
            m.substitute("schedule.policy", "concatenated windows", f"torchtitan has no "
                         f"{s.policy} scheduling; a sequence crossing a window boundary is cut "
                         f"there, without the key/value state ChunkFlow carries; {doc_mask}")
        m.substitute("workload.budget.global_batch_tokens", *global_batch_note(
            rc, facts, rows, what=f"windows of {rows.row_len} tokens", fill="of concatenated data"))
        return rows

    @staticmethod
    def _parallelism(rc: RunConfig, m: Mapping) -> dict[str, Any]:
        p = rc.parallel
        # autotune's FSDP2 mapping (see ParallelConfig): stage 0 replicates, 1-2 shard and
        # keep parameters gathered until backward, 3 reshards them after forward.
        sharded = p.zero_stage > 0
        m.carry("parallel.dp", "parallel.tp", "parallel.pp", "parallel.cp", "parallel.zero_stage")
        if p.cp > 1:
            m.substitute("schedule.cp_placement", "every window sharded across the cp ranks",
                         "torchtitan's context parallelism splits every batch along the "
                         "sequence; it has no per-sequence placement (DACP)")
        m.substitute("schedule.rank_split", "torchtitan's data-parallel sampler",
                     "torchtitan's loader gives each rank its own slice in arrival order")
        return {"data_parallel_replicate_degree": 1 if sharded else p.dp,
                "data_parallel_shard_degree": p.dp if sharded else 1,
                "fsdp_reshard_after_forward": "always" if p.zero_stage == 3 else "never",
                "tensor_parallel_degree": p.tp, "pipeline_parallel_degree": p.pp,
                "context_parallel_degree": p.cp}

    @staticmethod
    def _pipeline(rc: RunConfig, rows: RowBatch, training: dict[str, Any], m: Mapping
                  ) -> dict[str, Any]:
        if rc.parallel.pp == 1:
            return {}
        # Under a pipeline the accumulated micro-batches are the schedule's micro-batches:
        # one local batch holding all of them per step.
        training["local_batch_size"] = rows.micro * rows.accumulation
        m.carry("parallel.pp_schedule")
        return {"pipeline_parallel_schedule": "GPipe" if rc.parallel.pp_schedule == "gpipe"
                else "1F1B", "pipeline_parallel_microbatch_size": rows.micro}

    @staticmethod
    def _checkpoint(rc: RunConfig, facts: Facts, m: Mapping) -> dict[str, Any]:
        ck = rc.checkpointing
        m.carry("checkpointing.policy")
        if ck.policy in ("none", "full"):
            return {"mode": ck.policy}
        every = max(1, round(1 / ck.fraction))
        if every == 1:
            return {"mode": "full"}
        m.substitute("checkpointing.fraction", f"selective_ac_option '{every}' (one layer in "
                     f"every {every})",
                     f"torchtitan checkpoints every k-th layer, not the first "
                     f"{ck.checkpointed_layers(facts.dims.layers)}: as many layers, spread "
                     f"over the model" + ("; a fixed set where autotune decides per "
                                          "micro-batch" if ck.policy == "adaptive" else ""))
        return {"mode": "selective", "selective_ac_option": str(every)}
