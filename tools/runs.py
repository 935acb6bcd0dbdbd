"""Read training run directories (``metrics.jsonl``, ``config.yaml``, ``DONE``) for the results tools.

It serves the tools and the tests only (hence here, not in the amllm package). Lines are read by
``amllm.metrics.read_metrics``, the one reader of metrics.jsonl. Every problem a user can fix is raised as :class:`RunError` with a one-line message naming the
file (and line), so the CLIs can print it and exit 2 instead of dumping a traceback.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amllm.metrics import MetricsFileError, read_metrics

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"

TRAIN_FIELDS = ("tokens", "loss", "lr", "grad_norm", "beta", "beta_min", "beta_max", "beta_dg", "beta_cos", "beta_lam",
                "tokens_per_s", "time")
# optim.beta_terms per layer (Run.layer_terms)
LAYER_TERMS = ("betas_dg", "betas_cos", "betas_lam")
EVAL_FIELDS = ("tokens", "val_loss", "val_ppl")

# Column names of the paper's Table (LLaMA on C4), in its order; other methods are appended.
PAPER_METHODS = ("AdamW", "AM-AdamW", "Clip", "Restart")
# Paper's reference validation losses (60M / 100M LLaMA).
PAPER_VAL_LOSS = {
    "60M": {"AdamW": 4.02, "AM-AdamW": 3.95, "Clip": 3.99, "Restart": 3.97},
    "100M": {"AdamW": 3.87, "AM-AdamW": 3.79, "Clip": 3.84, "Restart": 3.82},
}
_OPTIM_NAMES = {"adamw": "AdamW", "am_adamw": "AM-AdamW", "sgd": "SGD", "am_sgd": "AM-SGD"}


class RunError(Exception):
    """A problem with the user's run directories; ``str(err)`` is the whole message."""


@dataclass
class Run:
    path: Path
    config: dict = field(default_factory=dict)
    train: dict[str, np.ndarray] = field(default_factory=dict)  # "step" + TRAIN_FIELDS, sorted by step
    eval: dict[str, np.ndarray] = field(default_factory=dict)  # "step" + EVAL_FIELDS, sorted by step
    beta_steps: np.ndarray | None = None  # steps that logged a per-layer "betas" vector
    betas: np.ndarray | None = None  # (len(beta_steps), n_layers)
    layer_terms: np.ndarray | None = None  # (len(beta_steps), 3, n_layers): LAYER_TERMS (NaN: not logged)
    done: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def _cfg_number(self, dotted: str) -> float | None:
        value = self.cfg(dotted)
        try:
            # float(): PyYAML reads "1e-3" (no dot) as a string.
            return None if value is None else float(value)
        except (TypeError, ValueError):
            raise RunError(f"{self.path / CONFIG}: {dotted} is {value!r}, not a number") from None

    # --- what the run is, for labels and tables -------------------------------------------------
    def _method(self) -> tuple[str, str] | None:
        """(paper table column, readable name), e.g. ("Clip", "AM-AdamW clip")."""
        name = self.cfg("optim.name")
        if name is None:
            return None
        readable = _OPTIM_NAMES.get(str(name).lower(), str(name))
        column = readable
        policy = str(self.cfg("optim.beta_policy") or "am").lower()
        if readable.startswith("AM-") and policy != "am":
            readable = f"{readable} {policy}"
            # The paper's Clip / Restart columns are AM-AdamW with that beta policy.
            column = policy.capitalize() if column == "AM-AdamW" else readable
        if readable.startswith("AM-") and self.cfg("optim.per_layer"):
            # A different method: must not be averaged with the global-beta runs.
            readable, column = f"{readable} per-layer", f"{column} per-layer"
        beta1 = self._cfg_number("optim.beta1")
        if beta1 is not None and beta1 != 0.9:
            # Another momentum (AdamW's β1, AM's β_max) is another setting, not a seed of the default one.
            tag = f"{'β_max' if readable.startswith('AM-') else 'β1'} {beta1:g}"
            readable, column = f"{readable} {tag}", f"{column} {tag}"
        return column, readable

    @property
    def method(self) -> str | None:
        """Paper table column: AdamW, AM-AdamW, Clip, Restart; others (SGD, per-layer ...) by name."""
        return (self._method() or (None,))[0]

    @property
    def schedule(self) -> str | None:
        warmup = self._cfg_number("schedule.warmup_steps")
        if warmup is None:
            return None
        return "warmup" if warmup > 0 else "no warmup"

    @property
    def model(self) -> str | None:
        model = self.cfg("model.name")
        return None if model is None else str(model)

    @property
    def lr(self) -> float | None:
        return self._cfg_number("optim.lr")

    @property
    def seed(self) -> Any:
        return self.cfg("train.seed")

    @property
    def group_label(self) -> str:
        """Label of everything but the seed, so seeds of one setting can be aggregated."""
        method = self._method()
        if method is None:
            return self.name
        parts = [method[1], self.schedule, self.lr is not None and f"lr {format_lr(self.lr)}", self.model]
        return ", ".join(p for p in parts if p)

    @property
    def label(self) -> str:
        if self.method is None or self.seed is None:
            return self.group_label
        return f"{self.group_label}, seed {self.seed}"

    # --- results --------------------------------------------------------------------------------
    def final_eval(self) -> tuple[float, float] | None:
        """(val_loss, val_ppl) of the last evaluation, or None when the run never evaluated."""
        if not len(self.eval.get("step", ())):
            return None
        return float(self.eval["val_loss"][-1]), float(self.eval["val_ppl"][-1])

    def best_eval(self) -> tuple[float, float, int] | None:
        """(val_loss, val_ppl, step) of the lowest finite validation loss."""
        loss = self.eval.get("val_loss")
        if loss is None or not np.isfinite(loss).any():
            return None
        i = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.nan)))
        return float(loss[i]), float(self.eval["val_ppl"][i]), int(self.eval["step"][i])


def format_lr(lr: float) -> str:
    """1e-3 rather than 0.001, as the paper writes learning rates."""
    mantissa, exp = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


# --- discovery ------------------------------------------------------------------------------------
def expand_run_dirs(args: list[str]) -> list[Path]:
    """Turn CLI arguments (run dirs, parent dirs of run dirs, globs) into run directories."""
    dirs: list[Path] = []
    for arg in args:
        # Expand globs ourselves: quoted on the shell or passed from Python they arrive verbatim.
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise RunError(f"{arg}: matches no files")
        for match in map(Path, matches):
            if match.is_file() and match.suffix == ".jsonl" and match.name != METRICS:
                dirs.append(match)  # a bundle (write_bundle): its runs are read by load_runs
                continue
            if not match.is_dir():
                raise RunError(f"{match}: {'not a directory' if match.exists() else 'no such directory'}")
            if (match / METRICS).exists() or (match / CONFIG).exists():
                dirs.append(match)
                continue
            children = sorted(p.parent for p in match.glob(f"*/{METRICS}"))
            if not children:
                raise RunError(f"{match}: no {METRICS} (is this a run directory?)")
            dirs.extend(children)
    return list(dict.fromkeys(dirs))  # one dir named twice (e.g. dir and glob) is one run


def load_runs(args: list[str]) -> list[Run]:
    """Runs from run directories, their parents, globs, and bundles (``FILE.jsonl``, or
    ``FILE.jsonl#GLOB`` for the bundle's runs whose name matches GLOB)."""
    runs = []
    for arg in args:
        path, sep, pattern = arg.partition("#")
        if sep and path.endswith(".jsonl"):
            if not Path(path).is_file():
                raise RunError(f"{path}: no such bundle file")
            runs += [r for r in read_bundle(Path(path)) if fnmatch.fnmatch(r.name, pattern)]
            continue
        for d in expand_run_dirs([arg]):
            runs += read_bundle(d) if d.is_file() else [load_run(d)]
    return runs


# --- bundles: many runs in one compact file ---------------------------------------------------------
#: what a bundle keeps of a train / eval line (the fields the tools read)
BUNDLE_TRAIN = ("step", "tokens", "loss", "lr", "grad_norm", "beta", "beta_min", "beta_max", "betas",
                "beta_dg", "beta_cos", "beta_lam", *LAYER_TERMS)
BUNDLE_EVAL = ("step", "tokens", "val_loss")


def _small(value):
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, list):
        return [_small(v) for v in value]
    return value


def write_bundle(runs: list[Run], out: Path, add: bool = False) -> int:
    """One JSON line per run: {"run", "done", "config", "train": [...], "eval": [...]} with the records
    reduced to BUNDLE_TRAIN / BUNDLE_EVAL at 7 digits (float32): a study's runs in one file that
    load_runs reads back (instead of a directory per run with a near-identical config.yaml each).

    ``add``: keep the lines already in ``out`` whose run is not among ``runs`` (a run of the same name
    is replaced by the new one), so a study finished in stages -- on machines whose run directories are
    gone -- grows one bundle instead of overwriting the seeds an earlier stage committed. Returns the
    number of runs the file now holds."""
    lines = []
    if add and out.is_file():
        new = {run.name for run in runs}
        for line in out.read_text().splitlines():
            if line.strip() and json.loads(line).get("run") not in new:
                lines.append(line)
    for run in runs:
        if not (run.path / METRICS).is_file():  # read from a bundle: its full records are gone
            raise RunError(f"{run.path}: --bundle takes run directories, and this run comes from a bundle; "
                           f"to merge, add the run directories to the bundle with --add")
    for run in runs:
        recs = read_metrics(run.path / METRICS)
        keep = {"train": BUNDLE_TRAIN, "eval": BUNDLE_EVAL}
        out_recs: dict = {"train": [], "eval": []}
        for rec in recs:
            if rec["kind"] in keep:
                out_recs[rec["kind"]].append({k: _small(rec[k]) for k in keep[rec["kind"]] if rec.get(k) is not None})
        lines.append(json.dumps({"run": run.name, "done": run.done, "config": run.config, **out_recs},
                                separators=(",", ":")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def read_bundle(path: Path) -> list[Run]:
    runs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("run"), str):
            raise RunError(f"{where}: not a bundle line (a JSON object with \"run\", \"config\", \"train\", \"eval\")")
        run = Run(path=path / item["run"], config=item.get("config") or {}, done=bool(item.get("done")))
        records = [{**r, "kind": "train"} for r in item.get("train", [])] + \
                  [{**r, "kind": "eval"} for r in item.get("eval", [])]
        runs.append(_fill(run, *_parse_records(records, [f"{where} ({item['run']})"] * len(records))))
    return runs


# --- what the CLIs (tools/plot.py, tools/summarize.py) share ------------------------------------
def runs_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, parent directories of runs, or globs")
    return parser


def load_runs_or_report(args: list[str]) -> list[Run] | None:
    """load_runs for a CLI: a user error becomes one "error:" line on stderr (no traceback) and None."""
    try:
        return load_runs(args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


# --- parsing --------------------------------------------------------------------------------------
def load_run(path: str | Path) -> Run:
    path = Path(path)
    metrics = path / METRICS
    if not metrics.is_file():
        raise RunError(f"{path}: no {METRICS} (is this a run directory?)")
    run = Run(path=path, config=_read_config(path / CONFIG), done=(path / "DONE").exists())
    run.lr, run.schedule  # noqa: B018 -- check the config's numbers here, where errors are reported
    return _fill(run, *_read_metrics(metrics))


def _fill(run: Run, train: list, evals: list, betas: list) -> Run:
    run.train = _columns(train, TRAIN_FIELDS)
    run.eval = _columns(evals, EVAL_FIELDS)
    if "val_ppl" in run.eval:
        # Older lines may lack val_ppl; it is exp(val_loss) by definition.
        missing = np.isnan(run.eval["val_ppl"]) & ~np.isnan(run.eval["val_loss"])
        with np.errstate(over="ignore"):
            run.eval["val_ppl"][missing] = np.exp(run.eval["val_loss"][missing])
    if betas:
        steps, rows = _last_per_step([s for s, _ in betas], [r for _, r in betas])
        run.beta_steps = np.asarray(steps)
        run.betas = np.asarray([b for b, _ in rows], dtype=float)
        run.layer_terms = np.asarray([t for _, t in rows], dtype=float)
    return run


def _read_config(path: Path) -> dict:
    if not path.exists():
        return {}
    import yaml  # only needed when a config exists

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunError(f"{path}: not valid YAML ({_one_line(err)})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RunError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config


def _read_metrics(path: Path):
    try:
        records = read_metrics(path)
    except MetricsFileError as err:
        raise RunError(str(err)) from None
    _note_unfinished(path)
    # read_metrics returns one record per non-blank line, in order: their line numbers for the messages
    linenos = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    return _parse_records(records, [f"{path} line {n}" for n in linenos])


def _parse_records(records: list[dict], wheres: list[str]):
    train: list[dict] = []
    evals: list[dict] = []
    betas: list[tuple[int, tuple[list[float], list[list[float]]]]] = []
    n_layers = None
    for where, rec in zip(wheres, records):
        kind = rec["kind"]
        if kind not in ("train", "eval"):
            continue  # other record kinds (e.g. run metadata) are not plotted
        if not isinstance(rec.get("step"), (int, float)) or isinstance(rec.get("step"), bool):
            raise RunError(f"{where}: missing or non-numeric \"step\"; fix or delete the line")
        fields = TRAIN_FIELDS if kind == "train" else EVAL_FIELDS
        row = {"step": int(rec["step"])}
        for key in fields:
            row[key] = _number(rec.get(key), key, where)
        (train if kind == "train" else evals).append(row)
        if kind == "train" and rec.get("betas") is not None:
            vec = rec["betas"]
            if not isinstance(vec, list) or not vec:
                raise RunError(f"{where}: \"betas\" must be a non-empty list of numbers")
            if n_layers is not None and len(vec) != n_layers:
                raise RunError(f"{where}: \"betas\" has {len(vec)} entries, earlier lines had {n_layers}")
            n_layers = len(vec)
            terms = []
            for key in LAYER_TERMS:  # per-layer β terms (optim.beta_terms), aligned with "betas"
                col = rec.get(key)
                terms.append([_number(v, key, where) for v in col] if isinstance(col, list) and len(col) == len(vec)
                             else [math.nan] * len(vec))
            betas.append((row["step"], ([_number(v, "betas", where) for v in vec], terms)))
    return train, evals, betas


def _note_unfinished(path: Path) -> None:
    """read_metrics skips a live run's unfinished last line silently; the tools say so."""
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            print(f"note: {path} line {len(lines)}: skipping unfinished last line", file=sys.stderr)


def _number(value: Any, key: str, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        # Some loggers write non-finite values as strings ("nan", "inf"): accept those.
        try:
            return float(value)
        except ValueError:
            pass
    raise RunError(f"{where}: \"{key}\" is {json.dumps(value)[:40]}, not a number; fix or delete the line")


def _last_per_step(steps: list[int], rows: list):
    """Keep the last record of each step, sorted by step: a resumed run re-logs the steps it redoes."""
    last = {s: i for i, s in enumerate(steps)}
    order = sorted(last)
    return order, [rows[last[s]] for s in order]


def _columns(rows: list[dict], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    steps, rows = _last_per_step([r["step"] for r in rows], rows)
    cols = {"step": np.asarray(steps, dtype=np.int64)}
    for key in fields:
        cols[key] = np.asarray([r[key] for r in rows], dtype=float)
    return cols


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# --- small helpers shared by the tools --------------------------------------------------------------
def natural_key(text: str | None) -> list:
    """Sort "llama_60m" before "llama_100m"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text or "")]
