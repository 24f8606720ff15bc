"""Trainer side of ``spmd-moe parity``: torchtitan 0.3.0's Qwen3 with spmd_moe's MoE
(use_spmd_moe), teacher-forced over the generator's sequences, at EP = TP = WORLD
(1 or 2 gloo ranks; sequence parallel on when WORLD > 1), batch-invariant mode.

    python -m spmd_moe.apps.parity_trainer WORLD HF_DIR GEN.pt OUT.pt

Figures (rank 0 writes OUT, torch.save): per-token logprobs vs the generator's (max
|delta| and how many are bitwise equal), the same after routing replay, the replay's
exactness, the MoE layers' rows recomputed from the generator's recorded inputs
(bitwise; and the control without the mode), and at WORLD=1 an op-by-op trace: every
stage of every layer (embedding, attention norm, attention, FFN norm, MoE, final norm)
compared row by row with the generator's recorded activations, chained (the trainer's
own forward) and, where the op can be run alone on the generator's recorded input,
isolated. The first stage that is not bitwise equal is the first op that breaks parity.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spmd_moe.errors import ConfigError


def _rank_main(rank: int, world: int, port: int, hf_dir: str, gen_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        res = trainer(rank, world, hf_dir, gen_path)
        if rank == 0:
            torch.save(res, out_path)
        # Every rank past its last collective before any tears its group down. (A fresh-clone
        # run once saw rank 0 abort near the end of the TP=2 trainer, "terminate called without
        # an active exception"; not reproduced in 5 reruns, cause not pinned down.)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _all_ranks(ok: bool) -> bool:
    t = torch.tensor([0 if ok else 1])
    dist.all_reduce(t)
    return int(t) == 0


def _sum_ranks(v: int) -> int:
    t = torch.tensor([v])
    dist.all_reduce(t)
    return int(t)


def _logprobs(model: nn.Module, tok: torch.Tensor, tp_group: Any, world: int) -> torch.Tensor:
    logits = model(tok)
    if world > 1:  # vocab-sharded over TP
        import torch.distributed.nn.functional as dnf

        logits = torch.cat(dnf.all_gather(logits.contiguous(), group=tp_group), dim=-1)  # type: ignore[no-untyped-call]
    return torch.log_softmax(logits.float(), dim=-1)


def _rows(gen: dict[str, Any], seqs_BL: torch.Tensor) -> list[tuple[int, int] | None]:
    """(sequence, position) of every row the generator scheduled, in call order."""
    B = seqs_BL.shape[0]
    rows: list[tuple[int, int] | None] = []
    for ids, pos in gen["calls"]:
        for t, p in zip(ids, pos):
            hit = [b for b in range(B) if p < seqs_BL.shape[1] and int(seqs_BL[b, p]) == t]
            rows.append((hit[0], p) if len(hit) == 1 else None)
    return rows


def _compare(gen_rows: torch.Tensor, tr_BLD: torch.Tensor, rows: list[tuple[int, int] | None]) -> dict[str, Any]:
    """Generator rows (call order) vs the trainer's [B, L, D] at the same (seq, pos)."""
    keep = [i for i, w in enumerate(rows) if w is not None]
    b = torch.tensor([rows[i][0] for i in keep])  # type: ignore[index]
    p = torch.tensor([rows[i][1] for i in keep])  # type: ignore[index]
    g = gen_rows[keep].float()
    t = tr_BLD[b, p].float()
    ne = (g != t).any(-1)
    return {"rows": len(keep), "rows_not_bitwise": int(ne.sum()), "max_abs_delta": float((g - t).abs().max()) if keep else 0.0}


STAGES = ("attn_norm", "qkv", "attn_core", "attn", "ffn_norm", "moe")


def trainer(rank: int, world: int, hf_dir: str, gen_path: str) -> dict[str, Any]:
    import torchtitan.distributed.parallel_dims as pdm
    from safetensors.torch import load_file

    pdm.device_type = "cpu"  # torchtitan falls back to "cuda" without an accelerator
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import get_spmd_context
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    from spmd_moe.batch_invariant import batch_invariant
    from spmd_moe.integrations.torchtitan import force_routes, moe_layers, use_spmd_moe

    gen = torch.load(gen_path, weights_only=False)
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    sp = world > 1
    cfg = use_spmd_moe(titan_config_for_tiny(hf), expert_dtype=None, sequence_parallel=sp)
    sd = Qwen3StateDictAdapter(cfg, None).from_hf(load_file(str(Path(hf_dir) / "model.safetensors")))
    pd = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=world, pp=1, ep=world, world_size=world)
    pd.build_mesh()
    tp_group = pd.get_mesh("tp").get_group() if world > 1 else None
    set_qwen3_sharding_config(cfg, enable_sp=sp, enable_ep=world > 1)
    model = cfg.build()
    model.load_state_dict(sd, strict=True)
    model.parallelize(pd)
    model.eval()
    ctx = get_spmd_context(parallel_dims=pd)
    seqs = gen["sequences"]
    P, N = len(seqs[0]["prompt"]), len(seqs[0]["tokens"])
    full_seqs = torch.tensor([s["prompt"] + s["tokens"] for s in seqs])  # [B, P+N]
    B, L = full_seqs.shape
    if L % world:
        full_seqs = torch.cat([full_seqs, full_seqs[:, -1:]], dim=1)  # SP needs L % TP == 0
        L += 1
    gen_lp = torch.tensor([s["logprobs"] for s in seqs], dtype=torch.float32)  # [B, N] (vLLM: fp32)
    layers = moe_layers(model)
    names = sorted(layers)
    out: dict[str, Any] = {"world": world, "B": B, "P": P, "N": N, "layers": names}

    def tok_lp(lp: torch.Tensor) -> torch.Tensor:  # logprob of generated token j at position P-1+j
        idx = full_seqs[:, P : P + N].unsqueeze(-1)
        return lp[:, P - 1 : P - 1 + N].gather(-1, idx).squeeze(-1)

    lo, hi = rank * L // world, (rank + 1) * L // world  # this rank's positions under SP
    gen_routes_BLK = _generator_routes(gen, names, B, P, N, L)
    trace: dict[str, torch.Tensor] = {}
    hooks = []
    if world == 1:
        mods = {"embed": model.tok_embeddings, "final_norm": model.norm}
        for i, blk in model.layers.items():
            mods.update({f"L{i}.attn_norm": blk.attention_norm, f"L{i}.attn": blk.attention,
                         f"L{i}.ffn_norm": blk.ffn_norm, f"L{i}.moe": blk.moe})
        for key, mod in mods.items():
            def hook(m: nn.Module, a: Any, o: Any, key: str = key) -> None:
                trace[key] = (o[0] if isinstance(o, tuple) else o).detach().clone()

            hooks.append(mod.register_forward_hook(hook))
        # Inside attention, as the generator's rank 0 (TP = gen["tp"]) holds it: its heads'
        # slice of q, k, v (concatenated like vLLM's qkv_proj) and of the kernel's output.
        tp_gen = int(gen["tp"])
        for i, blk in model.layers.items():
            att = blk.attention
            hd = att.head_dim
            nq, nkv = att.n_heads // tp_gen * hd, max(att.n_kv_heads // tp_gen, 1) * hd
            def qkv(m: nn.Module, a: Any, o: Any, key: str = f"L{i}.qkv", nq: int = nq, nkv: int = nkv) -> None:
                q, k, v = (t.flatten(-2) for t in o)  # [B, L, heads, hd] each -> this rank's heads
                trace[key] = torch.cat([q[..., :nq], k[..., :nkv], v[..., :nkv]], dim=-1).detach().clone()

            hooks.append(att.qkv_linear.register_forward_hook(qkv))

            def core(m: nn.Module, a: Any, key: str = f"L{i}.attn_core", width: int = nq) -> None:
                trace[key] = a[0][..., :width].detach().clone()

            hooks.append(att.wo.register_forward_pre_hook(core))

    with torch.no_grad(), ctx(), batch_invariant():
        for m in layers.values():
            m.record_routes = True
        lp_tok = tok_lp(_logprobs(model, full_seqs, tp_group, world))
        for h in hooks:
            h.remove()
        free = {n: layers[n].recorded_routes.pop() for n in names}
        out["max_abs_logprob_delta"] = float((lp_tok.double() - gen_lp.double()).abs().max())
        out["logprobs_bitwise_equal"] = int((lp_tok == gen_lp).sum())
        out["logprobs_compared"] = int(gen_lp.numel())
        # Routing replay: force the generator's routes (this rank's token slice).
        known = {n: (gen_routes_BLK[n][:, lo:hi] >= 0).all(-1).reshape(-1) for n in names}
        forced_in = {
            n: torch.where(known[n].unsqueeze(-1), gen_routes_BLK[n][:, lo:hi].reshape(-1, free[n].shape[-1]), free[n])
            for n in names
        }
        force_routes(model, forced_in)
        lp_f = tok_lp(_logprobs(model, full_seqs, tp_group, world))
        forced = {n: layers[n].recorded_routes.pop() for n in names}
        force_routes(model, None)
        out["max_abs_logprob_delta_replayed"] = float((lp_f.double() - gen_lp.double()).abs().max())
        out["logprobs_bitwise_equal_replayed"] = int((lp_f == gen_lp).sum())
        out["routes_replayed"] = _sum_ranks(sum(int(known[n].sum()) for n in names))
        # Routes compared as sets of experts per token (recorded in the router's k order).
        def srt(t: torch.Tensor) -> torch.Tensor:
            return t.sort(-1).values

        out["replay_exact"] = _all_ranks(all(
            torch.equal(srt(forced[n][known[n]]), srt(forced_in[n][known[n]])) for n in names
        ))
        out["routes_differing_without_replay"] = _sum_ranks(sum(
            int((srt(free[n][known[n]]) != srt(forced_in[n][known[n]])).any(-1).sum()) for n in names
        ))
        # The MoE layers alone: the generator's recorded inputs through the trainer's layers
        # (each rank every world-th row: other batches than vLLM's), with and without the mode.
        mism = rows = ctrl = 0
        for n in names:
            rec = gen["moe"][f"model.layers.{n.split('.')[1]}.mlp"]
            x_all, y_all = torch.cat(rec["x"]), torch.cat(rec["y"])
            mine = torch.arange(rank, x_all.shape[0], world)
            mism += int((layers[n](x_all[mine]) != y_all[mine]).any(-1).sum())
            rows += int(mine.numel())
            with batch_invariant(False):
                ctrl += int((layers[n](x_all[mine]) != y_all[mine]).any(-1).sum())
        out["moe_rows_compared"] = _sum_ranks(rows)
        out["moe_rows_not_bitwise"] = _sum_ranks(mism)
        out["moe_rows_not_bitwise_without_mode"] = _sum_ranks(ctrl)
        out["moe_layers_compared"] = len(names)
        if world == 1 and gen.get("trace"):
            out["trace"] = _trace(gen, trace, full_seqs, model)
    return out


def _trace(gen: dict[str, Any], trace: dict[str, torch.Tensor], seqs_BL: torch.Tensor, model: Any) -> dict[str, Any]:
    """Stage by stage, forward order: chained (the trainer's own forward) and isolated
    (the trainer's op on the generator's recorded input) comparisons."""
    rows = _rows(gen, seqs_BL)
    g = gen["trace"]
    stages: list[dict[str, Any]] = []
    order = ["embed"] + [f"L{i}.{s}" for i in sorted(model.layers.keys(), key=int) for s in STAGES] + ["final_norm"]
    for key in order:
        if key not in g or key not in trace:
            continue
        st: dict[str, Any] = {"stage": key, **_compare(torch.cat(g[key]["out"]), trace[key], rows)}
        i = key.split(".")[0][1:] if key.startswith("L") else None
        op: nn.Module | None = model.norm if key == "final_norm" else None
        if i is not None:
            blk = model.layers[i]
            op = {"attn_norm": blk.attention_norm, "ffn_norm": blk.ffn_norm, "moe": blk.moe}.get(key.split(".")[1])
        ins = g[key].get("in")
        res = g[key].get("in_res")
        if op is not None and ins and all(isinstance(t, torch.Tensor) for t in ins):
            # vLLM's norms after the first add the residual in the same call (fused):
            # the trainer adds first (x + y == y + x exactly), then normalises.
            x_in = torch.cat(ins)
            if res and not key.endswith("moe"):
                x_in = x_in + torch.cat(res)
            y = op(x_in)
            y_gen = torch.cat(g[key]["out"])
            st["isolated_rows_not_bitwise"] = int((y != y_gen).any(-1).sum())
            st["isolated_max_abs_delta"] = float((y.float() - y_gen.float()).abs().max())
        stages.append(st)
    first = next((s for s in stages if s["rows_not_bitwise"]), None)
    return {"stages": stages, "first_break": first["stage"] if first else None,
            "first_break_max_abs_delta": first["max_abs_delta"] if first else 0.0}


def main(argv: list[str]) -> None:
    import torch.multiprocessing as mp

    world, hf_dir, gen_path, out_path = int(argv[0]), argv[1], argv[2], argv[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.start_processes(_rank_main, args=(world, port, hf_dir, gen_path, out_path), nprocs=world,  # type: ignore[attr-defined,no-untyped-call]
                       start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1:])


def titan_config_for_tiny(hf: dict[str, Any]) -> Any:
    """The torchtitan Qwen3 config of a tiny HF Qwen3-MoE config.json (every layer MoE)."""
    if hf.get("mlp_only_layers"):
        raise ConfigError(
            f"parity: expected every layer to be MoE, got mlp_only_layers={hf['mlp_only_layers']}. "
            "Fix: build the tiny checkpoint with TinySpec(mlp_only_layers=())."
        )
    rope = hf.get("rope_parameters") or {}
    from spmd_moe.integrations.torchtitan import tiny_qwen3_moe_config

    return tiny_qwen3_moe_config(
        n_layers=hf["num_hidden_layers"], dim=hf["hidden_size"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
        moe_hidden_dim=hf["moe_intermediate_size"], num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
        top_k=hf["num_experts_per_tok"], vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"], load_balance_coeff=None,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
    )


def _generator_routes(gen: dict[str, Any], names: list[str], B: int, P: int, N: int, L: int) -> dict[str, torch.Tensor]:
    """Map the generator's per-call routes onto [B, L, K] (sequence, position), -1 where
    unknown. vLLM schedules prefill chunks and decode tokens of the requests as it likes;
    each scheduled row is identified by its (position, token id), which must match
    exactly one sequence (else it stays unknown and the trainer routes it itself)."""
    seqs = torch.tensor([s["prompt"] + s["tokens"] for s in gen["sequences"]])  # [B, P+N]
    rows: list[tuple[int, int] | None] = []
    for ids, pos in gen["calls"]:
        for t, p in zip(ids, pos):
            hit = [b for b in range(B) if p < seqs.shape[1] and int(seqs[b, p]) == t]
            rows.append((hit[0], p) if len(hit) == 1 else None)
    out: dict[str, torch.Tensor] = {}
    for n in names:
        rec = gen["moe"][f"model.layers.{n.split('.')[1]}.mlp"]
        calls = [torch.cat([per_rank[c] for per_rank in rec["routes"]]) for c in range(len(rec["routes"][0]))]
        flat = torch.cat(calls)
        if flat.shape[0] != len(rows):
            raise ConfigError(
                f"parity: generator layer {n}: expected one route per scheduled token "
                f"({len(rows)}), got {flat.shape[0]}. Fix: record routes and tokens in the same run."
            )
        r = torch.full((B, L, flat.shape[-1]), -1, dtype=torch.int64)
        for i, where in enumerate(rows):
            if where is not None:
                r[where[0], where[1]] = flat[i]
        out[n] = r
    return out
