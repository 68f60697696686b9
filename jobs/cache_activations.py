"""Cache transcoder activations over a corpus with Ray Data, then build feature dashboards.

    python -m jobs.cache_activations --model M --transcoder T --dataset D --n-tokens 10_000_000 --ctx-len 256 --out DIR
    ray job submit --working-dir . -- python -m jobs.cache_activations ...   (same flags)

Pipeline: read + tokenize + window (driver, deterministic) → shards of windows → `ShardEncoder` actor pool
(model + transcoder loaded once per actor; one GPU per actor when the cluster has GPUs) → one parquet of
sparse activations (layer, feature, sequence, position, activation) and one of token windows per shard, each
written under a temporary name and renamed, so a shard is complete or absent. Re-running resumes: completed
shards are skipped. `manifest.json` records the model, transcoder, dataset, settings and shards.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, model_validator

from jobs.corpus import CorpusError, read_texts, token_windows, writable


class CacheConfig(BaseModel):
    model: str | None = None
    transcoder: str | None = None
    preset: str | None = None
    dataset: str
    split: str = "train"
    text_column: str = "text"
    n_tokens: int = Field(1_000_000, ge=1)
    ctx_len: int = Field(256, ge=2)
    out: str
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    shard_windows: int = Field(256, ge=1, description="windows per output shard")
    threshold: float = Field(0.0, ge=0.0, description="keep activations above this")
    bos: bool = True
    filter_bos: bool = False
    num_actors: int | None = Field(None, ge=1)
    device: str = "auto"
    build_features: bool = True

    @model_validator(mode="after")
    def _pair(self) -> CacheConfig:
        if self.preset:
            from attribute_ray.presets import resolve_preset

            p = resolve_preset(self.preset)
            self.model, self.transcoder = self.model or p.model, self.transcoder or p.transcoder
        if not (self.model and self.transcoder):
            raise ValueError("give --model and --transcoder, or --preset")
        return self

    def identity(self) -> dict:
        """What must match for a re-run to resume the same cache."""
        return self.model_dump(include={"model", "transcoder", "dataset", "split", "text_column", "n_tokens", "ctx_len",
                                        "threshold", "bos", "filter_bos", "shard_windows"})


class ShardEncoder:
    """Ray Data actor: loads the replacement model once, encodes whole shards, writes them atomically."""

    def __init__(self, cfg: dict):
        import torch

        from attribute_ray import ReplacementModel

        self.cfg = CacheConfig.model_validate(cfg)
        device = self.cfg.device if self.cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = ReplacementModel.from_pretrained(self.cfg.model, self.cfg.transcoder, device=device, dtype=dtype)
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(self.cfg.out)

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "n_activations": [], "n_tokens": [], "bytes": []}
        for shard, first, tokens in zip(batch["shard"], batch["first"], batch["tokens"]):
            n_act, n_bytes = self.encode_shard(int(shard), int(first), np.stack(tokens).astype(np.int64))
            out["shard"].append(int(shard))
            out["n_activations"].append(n_act)
            out["n_tokens"].append(int(np.stack(tokens).size))
            out["bytes"].append(n_bytes)
        return {k: np.asarray(v) for k, v in out.items()}

    def encode_shard(self, shard: int, first: int, windows: np.ndarray) -> tuple[int, int]:
        import pyarrow as pa
        import torch

        _fault_hook(shard)
        cfg, rm = self.cfg, self.model
        tc = rm.transcoder
        cols: dict[str, list] = {"layer": [], "feature": [], "sequence": [], "position": [], "activation": []}
        T = windows.shape[1]
        for i in range(0, len(windows), cfg.batch_size):
            tokens = torch.from_numpy(windows[i : i + cfg.batch_size])
            inputs = rm.input_activations(tokens)
            for layer, x in enumerate(inputs):
                acts = tc.encode_sparse(layer, x.reshape(-1, x.shape[-1]))
                values = tc.gated(layer, layer, acts.values, acts.features)  # what the decoder consumes
                keep = values > cfg.threshold
                if cfg.bos:
                    keep &= (acts.rows % T) != 0
                rows = acts.rows[keep].cpu().numpy()
                cols["layer"].append(np.full(len(rows), layer, np.int16))
                cols["feature"].append(acts.features[keep].cpu().numpy().astype(np.int32))
                cols["sequence"].append((first + i + rows // T).astype(np.int64))
                cols["position"].append((rows % T).astype(np.int16))
                cols["activation"].append(values[keep].float().cpu().numpy())
        table = pa.table({k: np.concatenate(v) for k, v in cols.items()})
        table = table.sort_by([("sequence", "ascending"), ("position", "ascending"), ("layer", "ascending"),
                               ("feature", "ascending")])
        seq = np.arange(first, first + len(windows), dtype=np.int64)
        tok_table = pa.table({"sequence": seq, "tokens": pa.array(list(windows.astype(np.int32)), pa.list_(pa.int32()))})
        n_bytes = self._write(f"tokens/{shard:06d}.parquet", tok_table)
        n_bytes += self._write(f"shards/{shard:06d}.parquet", table)  # last: its presence marks the shard done
        return table.num_rows, n_bytes

    def _write(self, rel: str, table) -> int:
        import pyarrow.parquet as pq

        path = f"{self.root.rstrip('/')}/{rel}"
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.mv(tmp, path)
        return self.fs.size(path)


def _fault_hook(shard: int) -> None:
    """Test hook: ATTRIBUTE_RAY_CRASH_SHARD="<shard>:<marker file>" kills the actor process once on that shard."""
    spec = os.environ.get("ATTRIBUTE_RAY_CRASH_SHARD")
    if spec:
        target, marker = spec.split(":", 1)
        if int(target) == shard and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit` or against a cluster: resource arguments are rejected (ray-notes #7)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def run(cfg: CacheConfig) -> dict:
    """Run (or resume) the caching job; returns the manifest."""
    import fsspec

    writable(cfg.out)
    fs, root = fsspec.core.url_to_fs(cfg.out)
    root = root.rstrip("/")
    manifest_path = f"{root}/manifest.json"
    if fs.exists(manifest_path):
        old = json.loads(fs.cat_file(manifest_path))
        if old.get("config") != cfg.identity():
            raise CorpusError(f"{cfg.out} holds a cache made with different settings: {old.get('config')}; "
                              "use another --out or delete it")
    from attribute_ray.replacement import load_tokenizer

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    windows = token_windows(tokenizer, read_texts(cfg.dataset, split=cfg.split, text_column=cfg.text_column),
                            ctx_len=cfg.ctx_len, n_tokens=cfg.n_tokens, bos=cfg.bos, filter_bos=cfg.filter_bos)
    shards = [(i, s, min(cfg.shard_windows, len(windows) - s)) for i, s in enumerate(range(0, len(windows), cfg.shard_windows))]
    done = lambda: {int(Path(p).stem) for p in fs.glob(f"{root}/shards/*.parquet")}  # noqa: E731
    summaries: dict[int, dict] = {}
    pending = [s for s in shards if s[0] not in done()]
    if not pending:
        print(f"all shards present ({len(shards)}) in {cfg.out}: nothing to do")
    t_encode = time.perf_counter()
    for attempt in range(3):  # a crashed actor's shard is retried by Ray; anything still missing, by us
        pending = [s for s in shards if s[0] not in done()]
        if not pending:
            break
        summaries.update(_encode(cfg, windows, pending))
    t_encode = time.perf_counter() - t_encode
    missing = [s[0] for s in shards if s[0] not in done()]
    if missing:
        raise RuntimeError(f"shards {missing[:20]} failed after 3 attempts")
    _clean_tmp(fs, root)
    import pyarrow.parquet as pq

    n_act = {}
    for sid, _, _ in shards:
        n_act[sid] = summaries[sid]["n_activations"] if sid in summaries else pq.ParquetFile(
            fs.open(f"{root}/shards/{sid:06d}.parquet")).metadata.num_rows
    from attribute_ray.transcoders import load_transcoder

    tc_meta = load_transcoder(cfg.transcoder) if cfg.build_features else None
    n_valid = int(windows.shape[0] * (windows.shape[1] - (1 if cfg.bos else 0)))
    manifest = {
        "config": cfg.identity(),
        "model": cfg.model,
        "transcoder": cfg.transcoder,
        "n_layers": tc_meta.n_layers if tc_meta else None,
        "n_features": [tc_meta.n_features(l) for l in range(tc_meta.n_layers)] if tc_meta else None,
        "ctx_len": cfg.ctx_len,
        "n_sequences": int(len(windows)),
        "n_tokens": n_valid,
        "bos": cfg.bos,
        "threshold": cfg.threshold,
        "dataset": {"id": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column},
        "shards": [{"id": sid, "first_sequence": first, "n_sequences": n, "n_activations": n_act[sid]} for sid, first, n in shards],
        "last_run": {"encoded_tokens": sum(s["n_tokens"] for s in summaries.values()), "encode_seconds": t_encode},
    }
    tmp = f"{manifest_path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, json.dumps(manifest, indent=2).encode())
    fs.mv(tmp, manifest_path)
    seconds = time.perf_counter() - t0
    n_bytes = sum(fs.size(p) for p in fs.glob(f"{root}/shards/*.parquet") + fs.glob(f"{root}/tokens/*.parquet"))
    encoded = manifest["last_run"]["encoded_tokens"]
    print(f"cached {manifest['n_sequences']} windows × {cfg.ctx_len} tokens in {len(shards)} shards "
          f"({len(summaries)} encoded now at {encoded / max(t_encode, 1e-9):,.0f} tok/s; {seconds:.1f}s in all), "
          f"{sum(n_act.values()):,} activations, {n_bytes / 2**20:.1f} MiB → {cfg.out}")
    return manifest


def _encode(cfg: CacheConfig, windows: np.ndarray, pending: list[tuple[int, int, int]]) -> dict[int, dict]:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    _init_ray()
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 600  # a clear error instead of waiting forever for unschedulable actors
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    n_actors = cfg.num_actors or max(1, int(gpus) if gpus else min(4, int(cpus) // 2 or 1))
    items = [{"shard": sid, "first": first, "tokens": list(windows[first : first + n])} for sid, first, n in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    out = ds.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"cfg": cfg.model_dump(exclude={"preset"})},
        batch_size=1,
        compute=ActorPoolStrategy(min_size=1, max_size=min(n_actors, len(items))),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
        max_restarts=3,
        max_task_retries=3,
    )
    results: dict[int, dict] = {}
    try:
        for row in out.iter_rows():
            results[int(row["shard"])] = {k: int(row[k]) for k in ("n_activations", "n_tokens", "bytes")}
    except Exception as e:  # noqa: BLE001 - missing shards are retried by the caller
        print(f"encoding round failed ({type(e).__name__}: {str(e)[:300]}); retrying missing shards")
    return results


def _clean_tmp(fs, root: str) -> None:
    for p in fs.glob(f"{root}/*/*.tmp") + fs.glob(f"{root}/*.tmp"):
        fs.rm_file(p)


def parse_args(argv: list[str] | None = None) -> CacheConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.cache_activations", description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--transcoder")
    p.add_argument("--preset")
    p.add_argument("--dataset", required=True, help="HF dataset id, or a .txt/.jsonl/.parquet file or directory")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--n-tokens", type=lambda s: int(s.replace("_", "")), default=1_000_000)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--out", required=True, help="output directory or fsspec URI")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-windows", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--no-bos", dest="bos", action="store_false")
    p.add_argument("--filter-bos", action="store_true")
    p.add_argument("--num-actors", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-features", dest="build_features", action="store_false", help="skip the dashboard step")
    a = vars(p.parse_args(argv))
    return CacheConfig(**{k: v for k, v in a.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    import sys

    try:
        cfg = parse_args(argv)
        run(cfg)
        if cfg.build_features and "://" in cfg.out:
            print("feature dashboards read local caches: copy the cache locally, then run python -m jobs.build_features DIR")
        elif cfg.build_features:
            from jobs.build_features import build

            build(cfg.out)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
