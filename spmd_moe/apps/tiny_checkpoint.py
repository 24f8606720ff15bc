"""The embedded tiny Qwen3-MoE checkpoint: built here from a fixed seed, no downloads.

Two folders hold the same weights (fp32, about 3.5 MB each):

* ``hf/``   -- what ``transformers`` ``save_pretrained`` writes: ``config.json`` plus
  ``model.safetensors`` with per-expert names (``mlp.experts.{e}.gate_proj.weight``).
  vLLM's native ``Qwen3MoeForCausalLM`` and HF ``generate`` read it.
* ``spmd/`` -- no ``config.json``: only ``spmd_moe.json`` (this project's config format)
  and ``model.safetensors`` with the fused transformers-v5 expert names
  (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]).

Every tensor is drawn from its own generator, seeded by (seed, tensor name), so the
weights do not depend on transformers' init order or version. The build goes to a
temporary folder and is renamed into place, so concurrent builders do not collide;
a manifest with each tensor's sha256 lets a reuse verify the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spmd_moe.errors import CheckpointError

from spmd_moe.integrations.vllm.names import NATIVE_ARCH, SPMD_ARCH, SPMD_CONFIG_NAME, SPMD_FORMAT

__all__ = ["NATIVE_ARCH", "SPMD_ARCH", "SPMD_CONFIG_NAME", "SPMD_FORMAT", "TinySpec", "build_tiny_checkpoint"]
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinySpec:
    """Hyperparameters of the tiny model (Qwen3-MoE field names)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256  # the dense MLP of mlp_only_layers
    moe_intermediate_size: int = 48  # 2F != D: a transposed fused tensor fails the shape check
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64  # one the vLLM CPU attention supports
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    mlp_only_layers: tuple[int, ...] = (1,)  # layers 0 and 2 are MoE, layer 1 dense
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    std: float = 0.02
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def hf_config_kwargs(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("std", "seed", "extra", "rope_theta"):
            d.pop(k)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["initializer_range"] = self.std
        d["decoder_sparse_step"] = 1
        d["hidden_act"] = "silu"
        d["dtype"] = "float32"
        d.update(self.extra)
        return d

    def key(self) -> str:
        blob = json.dumps({"v": _FORMAT_VERSION, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TinyCheckpoint:
    root: Path
    spec: TinySpec

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf"

    @property
    def spmd_dir(self) -> Path:
        return self.root / "spmd"


def default_cache_dir() -> Path:
    env = os.environ.get("SPMD_MOE_CACHE")
    return Path(env) if env else Path.cwd() / ".spmd_moe_cache"


def _seeded(shape: tuple[int, ...], seed: int, name: str, std: float, mean: float = 0.0) -> torch.Tensor:
    s = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")
    g = torch.Generator().manual_seed(s)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(torch.float32)


def make_state_dict(spec: TinySpec) -> dict[str, torch.Tensor]:
    """The model's weights in transformers-v5 in-memory names (fused experts)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**spec.hf_config_kwargs())
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    sd: dict[str, torch.Tensor] = {}
    for name, p in sorted(model.state_dict().items()):
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            # Not all ones: a swapped or skipped norm weight must change the output.
            sd[name] = _seeded(shape, spec.seed, name, 0.1, mean=1.0)
        else:
            sd[name] = _seeded(shape, spec.seed, name, spec.std)
    return sd


def per_expert_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused expert tensors -> per-expert names (what save_pretrained writes)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :F].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, F:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def spmd_config_dict(spec: TinySpec) -> dict[str, Any]:
    """The content of spmd_moe.json for this spec."""
    return {
        "format": SPMD_FORMAT,
        "format_version": _FORMAT_VERSION,
        "architecture": SPMD_ARCH,
        "model_type": "qwen3_moe",
        "model": spec.hf_config_kwargs(),
    }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _build(spec: TinySpec, dest: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    sd = make_state_dict(spec)
    hf_dir, spmd_dir = dest / "hf", dest / "spmd"
    hf_dir.mkdir(parents=True)
    spmd_dir.mkdir(parents=True)
    # HF folder through transformers itself, so its file is what users have.
    cfg = Qwen3MoeConfig(**spec.hf_config_kwargs())
    cfg.architectures = [NATIVE_ARCH]
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    # spmd folder: fused names, our config format, nothing else.
    save_file({k: v.contiguous() for k, v in sd.items()}, str(spmd_dir / "model.safetensors"), metadata={"format": "pt"})
    (spmd_dir / SPMD_CONFIG_NAME).write_text(json.dumps(spmd_config_dict(spec), indent=2, sort_keys=True))
    manifest = {"spec_key": spec.key(), "tensors": {k: _digest(v) for k, v in sorted(sd.items())}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify(ckpt: TinyCheckpoint) -> None:
    """Raise CheckpointError unless both folders hold the manifest's tensors."""
    from safetensors.torch import load_file

    man = json.loads((ckpt.root / "manifest.json").read_text())
    want: dict[str, str] = man["tensors"]
    fused = load_file(str(ckpt.spmd_dir / "model.safetensors"))
    got = {k: _digest(v) for k, v in fused.items()}
    if got != want:
        bad = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise CheckpointError(
            f"tiny checkpoint {ckpt.spmd_dir}: expected the manifest's tensors, got "
            f"differences in {bad}. Fix: delete {ckpt.root} to rebuild it."
        )
    hf = load_file(str(ckpt.hf_dir / "model.safetensors"))
    hf_want = per_expert_names(fused)
    if set(hf) != set(hf_want) or any(not torch.equal(hf[k], hf_want[k]) for k in hf):
        raise CheckpointError(
            f"tiny checkpoint {ckpt.hf_dir}: expected the per-expert form of the manifest's "
            f"tensors, got other names or values. Fix: delete {ckpt.root} to rebuild it."
        )


def build_tiny_checkpoint(
    cache_dir: str | Path | None = None, spec: TinySpec | None = None, *, rebuild: bool = False
) -> TinyCheckpoint:
    """Build (or reuse) the tiny checkpoint under ``cache_dir`` and return its folders."""
    spec = spec or TinySpec()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"tiny_qwen3_moe_{spec.key()}"
    ckpt = TinyCheckpoint(root, spec)
    if root.exists() and not rebuild:
        try:
            verify(ckpt)
            return ckpt
        except (CheckpointError, OSError, ValueError, KeyError):
            pass  # damaged or half-written: rebuild below
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building_", dir=cache))
    try:
        _build(spec, tmp / "ckpt")
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp / "ckpt", root)
        except OSError:
            if not root.exists():
                raise  # another builder won the race otherwise: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify(ckpt)
    return ckpt


if __name__ == "__main__":
    c = build_tiny_checkpoint()
    print(c.root)
