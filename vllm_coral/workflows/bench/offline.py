"""``vllm-coral bench offline``: every method on the same questions, one vLLM engine each.

For each method row (see :mod:`.methods`) an engine is started (``vllm.LLM`` through
:func:`vllm_coral.plugin.engine.open_llm`, the same settings for every row) and run on
every dataset at every temperature, so the start-up is paid once per engine:

- the target alone, ngram: one engine for all temperatures;
- drafters with token probabilities (draft_model, eagle, hass, coral): one engine per
  draft sampling mode, since vLLM fixes it per engine. T=0 runs on the ``greedy`` engine
  (at T=0 both modes draft the argmax); each T>0 runs on every mode asked for.

Questions run turn by turn: all first turns (in batches of ``batch_size``), then the
second turns with each conversation's own first answer, and so on. Per (dataset, T, row):
output tokens/s over the generate calls, speedup over the target alone at the same
(dataset, T) measured in the same invocation, τ / per-position acceptance / draft
acceptance rate from vLLM's spec-decode counters (the difference of two snapshots), and
at T=0 the correctness guard against the target's tokens (:mod:`.guard`).

Speedups are paired, so that they survive a busy machine: the target alone's engine
stays open for the whole run, and every method's (dataset, T) pass is timed next to a
target pass on the same prompts, in alternating order (target first on even repeats,
method first on odd ones), each speedup against its own neighbour. With ``repeats`` N a
method runs each (dataset, T) N times, and the reports give the median ratio with its
min-max (:func:`.report.aggregate_repeats`). A background job that starts or stops
between two methods then moves both sides of a ratio alike (a run without pairing once
showed a drafter at τ 1.33 as 2.6x faster than the target). The target alone's own rows
come from its first pass, the reference of the correctness guard.

At T>0 every request has its own seed (the run seed and a hash of the request id), so
a rerun draws the same samples however the requests are batched.

A row that cannot run (bad config, engine that fails to start or crashes) is reported
with its one-line error and the run goes on; only a failing target alone stops it, as no
speedup can be measured without it.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vllm_coral.prompts import Prompt
from vllm_coral.workflows.bench.guard import compare_tokens
from vllm_coral.workflows.bench.methods import BenchError, MethodSpec
from vllm_coral.workflows.bench.questions import conversation
from vllm_coral.workflows.bench.server import one_line

__all__ = ["OfflineRow", "engine_plan", "fill_speedups", "request_seed", "run_offline", "set_acceptance"]


@dataclass
class OfflineRow:
    dataset: str
    # Row label and method kind (MethodSpec.name / .method).
    method: str
    kind: str
    temperature: float
    # vLLM draft sampling mode this row's engine used; None where it does not apply.
    draft_sample_method: str | None
    num_speculative_tokens: int | None
    speculative_config: dict | None
    requests: int = 0
    output_tokens: int = 0
    # Wall-clock seconds of the generate calls alone.
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    # tokens/s over the target alone's pass paired with this one; None if either failed.
    speedup: float | None = None
    # tokens/s of that paired target pass (the target alone's own rows: None).
    baseline_tokens_per_second: float | None = None
    mean_acceptance_length: float | None = None
    acceptance_per_position: list[float] = field(default_factory=list)
    draft_acceptance_rate: float | None = None
    # Raw vLLM counters of this row (num_drafts, num_draft_tokens, ...).
    spec_counters: dict | None = None
    # T=0 only, against the target alone: GuardResult.to_dict().
    guard: dict | None = None
    # Seconds to start this row's engine (shared by the rows of one engine).
    startup_s: float | None = None
    error: str | None = None
    # Which repeat of this method's (dataset, T) pass this row is (0 .. repeats-1).
    repeat: int = 0
    # Engine seconds per step phase in the generate calls (PhaseTimes.to_dict(); see
    # vllm_coral.plugin.phases); None where the engine timed none.
    phases: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def engine_plan(
    specs: list[MethodSpec],
    temperatures: list[float],
    draft_sample_methods: list[str],
) -> list[tuple[MethodSpec, str | None, list[float]]]:
    """(method, draft sampling mode, temperatures) per engine, the target alone first.

    Worked example: temperatures [0, 1], modes [greedy, probabilistic] -> target: (None,
    [0, 1]); ngram: (None, [0, 1]); eagle: (greedy, [0, 1]) and (probabilistic, [1]).
    """
    plan = []
    for spec in specs:
        if not spec.has_draft_probs:
            plan.append((spec, None, list(temperatures)))
            continue
        engines: dict[str, list[float]] = {}
        for t in temperatures:
            for mode in ["greedy"] if t == 0.0 else draft_sample_methods:
                engines.setdefault(mode, []).append(t)
        plan += [(spec, mode, temps) for mode, temps in engines.items()]
    return plan


@dataclass(frozen=True)
class _Settings:
    max_tokens: int
    batch_size: int | None
    seed: int
    dtype: str
    repeats: int = 1


def run_offline(
    model: str | Path,
    specs: list[MethodSpec],
    datasets: dict[str, list[Prompt]],
    *,
    temperatures: list[float],
    draft_sample_methods: list[str],
    max_tokens: int = 128,
    batch_size: int | None = 8,
    seed: int = 0,
    dtype: str = "float32",
    repeats: int = 1,
    log=print,
) -> list[OfflineRow]:
    """The target alone's rows (one per dataset and T), then one row per (method engine,
    dataset, T, repeat), each with its speedup over its paired target pass."""
    if repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {repeats}")
    plan = engine_plan(specs, temperatures, draft_sample_methods)
    if not plan or plan[0][0].method != "none":
        raise BenchError("the plan must start with the target alone (resolve_methods adds it)")
    settings = _Settings(max_tokens, batch_size, seed, dtype, repeats)
    # (dataset, T) -> the target alone's (output tokens, prompt tokens) per request.
    reference: dict[tuple[str, float], tuple[dict[str, list[int]], dict[str, list[int]]]] = {}
    total = len(plan)
    with _target_engine(model, plan[0][0], settings, log, f"[1/{total}] {plan[0][0].name}") as baseline:
        rows = _target_rows(baseline, plan[0][0], plan[0][2], datasets, settings, reference, log)
        for n, (spec, mode, temps) in enumerate(plan[1:], 2):
            label = f"[{n}/{total}] " + spec.name + (f" ({mode})" if mode else "")
            rows += _run_engine(model, spec, mode, temps, datasets, settings, reference, label, log, baseline)
    return rows


@contextmanager
def _target_engine(model, spec: MethodSpec, settings: _Settings, log, label: str):
    """The target alone's engine, open for the whole run; failing to start stops the run."""
    from vllm_coral.plugin.engine import engine_kwargs, open_llm

    log(f"{label}: starting vLLM ...")
    try:
        manager = open_llm(**engine_kwargs(model, speculative_config=None, dtype=settings.dtype, seed=settings.seed))
        llm = manager.__enter__()
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"the target alone failed, nothing to compare with: {one_line(e)}") from e
    try:
        yield llm
    finally:
        manager.__exit__(None, None, None)


def _target_rows(llm, spec: MethodSpec, temps: list[float], datasets: dict[str, list[Prompt]], settings: _Settings,
                 reference: dict, log) -> list[OfflineRow]:  # fmt: skip
    """The target alone's first pass over every (dataset, T): its rows and the guard's reference."""
    rows = []
    for t in temps:
        for dataset, prompts in datasets.items():
            row = OfflineRow(dataset=dataset, method=spec.name, kind=spec.method, temperature=t, draft_sample_method=None,
                             num_speculative_tokens=None, speculative_config=None, startup_s=llm.vllm_coral_startup_s)  # fmt: skip
            try:
                tokens, prompt_ids = _run_dataset(llm, prompts, row, settings, warmup=not rows,
                                                  desc=f"{spec.name} · {dataset} T={t:g}")  # fmt: skip
            except Exception as e:  # noqa: BLE001
                raise BenchError(f"the target alone failed, nothing to compare with: {one_line(e)}") from e
            row.speedup = 1.0
            if t == 0.0:
                reference[(dataset, t)] = (tokens, prompt_ids)
            rows.append(row)
            log(f"    {_summary(row)}")
    return rows


def _run_engine(model, spec: MethodSpec, mode: str | None, temps: list[float], datasets: dict[str, list[Prompt]],
                settings: _Settings, reference: dict, label: str, log, baseline) -> list[OfflineRow]:  # fmt: skip
    """One method's vLLM engine: every dataset at every temperature, ``settings.repeats``
    times, each pass paired with a target pass on ``baseline``; a failure becomes error rows."""
    from vllm_coral.plugin.engine import engine_kwargs, open_llm

    config = spec.engine_config(mode)
    k = (config or {}).get("num_speculative_tokens")

    def new_row(dataset: str, t: float, **kw) -> OfflineRow:
        return OfflineRow(dataset=dataset, method=spec.name, kind=spec.method, temperature=t,
                          draft_sample_method=mode, num_speculative_tokens=k, speculative_config=config, **kw)  # fmt: skip

    if spec.error:
        log(f"{label}: skipped: {spec.error}")
        return [new_row(d, t, error=spec.error) for t in temps for d in datasets]
    log(f"{label}: starting vLLM ...")
    rows: list[OfflineRow] = []
    try:
        kwargs = engine_kwargs(model, speculative_config=config, dtype=settings.dtype, seed=settings.seed)
        with open_llm(**kwargs) as llm:
            for t in temps:
                for dataset, prompts in datasets.items():
                    for rep in range(settings.repeats):
                        row = new_row(dataset, t, startup_s=llm.vllm_coral_startup_s, repeat=rep)
                        _paired_pass(llm, baseline, prompts, row, settings, reference, warmup=not rows,
                                     desc=f"{spec.name} · {dataset} T={t:g}")  # fmt: skip
                        rows.append(row)
                        log(f"    {_summary(row)}")
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001
        error = f"vLLM engine failed: {one_line(e)}"
        log(f"    {label}: {error}")
        done = {(r.dataset, r.temperature) for r in rows}
        rows += [new_row(d, t, error=error) for t in temps for d in datasets if (d, t) not in done]
    return rows


def _paired_pass(llm, baseline, prompts: list[Prompt], row: OfflineRow, settings: _Settings, reference: dict, *,
                 warmup: bool, desc: str) -> None:  # fmt: skip
    """One pass of the method and one of the target alone, next to each other (target
    first on even repeats); fills ``row`` with its figures, guard and paired speedup. A
    failing method pass becomes the row's error; a failing target pass stops the run."""
    target = replace(row, method="target", kind="none", speculative_config=None)
    order = ("target", "method") if row.repeat % 2 == 0 else ("method", "target")
    tokens = None
    for who in order:
        if who == "target":
            try:
                _run_dataset(baseline, prompts, target, settings, warmup=False, desc=f"target · {desc}")
            except Exception as e:  # noqa: BLE001
                raise BenchError(f"the target alone failed, nothing to compare with: {one_line(e)}") from e
            continue
        try:
            tokens, _ = _run_dataset(llm, prompts, row, settings, warmup=warmup, desc=desc)
        except Exception as e:  # noqa: BLE001 - a crashed row is reported, the run goes on
            row.error = f"generation failed: {one_line(e)}"
    if row.error is not None:
        return
    row.baseline_tokens_per_second = target.tokens_per_second
    row.speedup = row.tokens_per_second / target.tokens_per_second if target.tokens_per_second > 0 else None
    if tokens is not None and row.temperature == 0.0 and (row.dataset, 0.0) in reference:
        want, want_prompts = reference[(row.dataset, 0.0)]
        row.guard = compare_tokens(want, tokens, want_prompts).to_dict()


def _run_dataset(llm, prompts: list[Prompt], row: OfflineRow, settings: _Settings, *, warmup: bool,
                 desc: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:  # fmt: skip
    """All turns of all prompts; fills the row's figures. Returns request id -> output
    tokens and request id -> prompt tokens."""
    from tqdm import tqdm

    from vllm_coral.plugin.engine import timed_chat
    from vllm_coral.plugin.metrics import SpecDecodeCounters
    from vllm_coral.plugin.phases import PhaseTimes

    answers: dict[str, list[str]] = {p.id: [] for p in prompts}
    tokens: dict[str, list[int]] = {}
    prompt_ids: dict[str, list[int]] = {}
    counters = SpecDecodeCounters()
    phases = PhaseTimes()
    total = sum(len(p.turns) for p in prompts)
    with tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True) as bar:
        for turn in range(1, max(len(p.turns) for p in prompts) + 1):
            active = [p for p in prompts if len(p.turns) >= turn]
            ids = [f"{p.id}/turn{turn}" for p in active]
            params = [_sampling(row.temperature, settings.max_tokens, settings.seed, rid) for rid in ids]
            convs = [conversation(p, turn, answers[p.id]) for p in active]
            run = timed_chat(llm, convs, params, warmup=warmup and turn == 1, batch_size=settings.batch_size,
                             on_chunk=bar.update)  # fmt: skip
            for p, rid, ids_, text, prompt in zip(active, ids, run.token_ids, run.texts, run.prompt_token_ids):
                answers[p.id].append(text)
                tokens[rid] = ids_
                prompt_ids[rid] = prompt
            row.seconds += run.seconds
            row.output_tokens += run.num_output_tokens
            counters = counters + run.spec
            phases = phases + run.phases
    row.requests = len(tokens)
    row.phases = phases.to_dict() if phases.steps else None
    row.tokens_per_second = row.output_tokens / row.seconds if row.seconds else 0.0
    if row.speculative_config is not None:
        set_acceptance(row, counters)
    return tokens, prompt_ids


def _sampling(temperature: float, max_tokens: int, seed: int, request_id: str):
    from vllm_coral.plugin.engine import sampling_params

    if temperature == 0.0:
        return sampling_params(temperature=0.0, max_tokens=max_tokens)
    return sampling_params(temperature=temperature, max_tokens=max_tokens, seed=request_seed(seed, request_id))


def request_seed(seed: int, request_id: str) -> int:
    """Per-request sampling seed, independent of batching and of the other requests."""
    return (seed * 1_000_003 + zlib.crc32(request_id.encode())) % (2**31)


def set_acceptance(row, counters) -> None:
    """A row's acceptance figures (offline or served) from its vLLM spec-decode counters."""
    for name, value in counters.row_fields().items():
        setattr(row, name, value)


def fill_speedups(rows: list, key) -> None:
    """Each row's tokens/s over the target alone's at the same ``key(row)``; None where
    either failed. Offline the key is (dataset, T), served (dataset, concurrency)."""
    base = {key(r): r.tokens_per_second for r in rows
            if r.kind == "none" and r.error is None and r.tokens_per_second > 0}  # fmt: skip
    for r in rows:
        b = base.get(key(r))
        r.speedup = r.tokens_per_second / b if b and r.error is None else None


def _summary(row: OfflineRow) -> str:
    if row.error:
        return f"{row.dataset} T={row.temperature:g}: error: {row.error}"
    text = f"{row.dataset} T={row.temperature:g}: {row.requests} requests, {row.tokens_per_second:.1f} tok/s"
    if row.mean_acceptance_length is not None:
        text += f", τ {row.mean_acceptance_length:.2f}"
    if row.guard is not None:
        text += f", identical {row.guard['identical']}/{row.guard['compared']}"
    return text
