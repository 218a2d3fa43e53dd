"""``vllm-coral bench serve``: each method behind a real ``vllm serve``, under load.

For each method row a server is started (:func:`.server.served`: plugin loaded through
vLLM's entry point, 127.0.0.1 only, stopped by process group always), then driven by the
OpenAI client at each concurrency level on the same questions. A level runs every
question as a session: its turns in order, each turn's prompt carrying the session's own
earlier answers, with ``concurrency`` sessions in flight at once. Requests stream, so the
client sees when each chunk arrives:

- TTFT: request sent -> first chunk with content;
- ITL: gaps between consecutive content chunks. With speculation one chunk can carry
  several tokens (everything accepted in one step), so ITL is per chunk, as in vLLM's
  own serving benchmark; TPOT, (latency - TTFT) / (tokens - 1), is per token;
- output tokens: the server's own count (``stream_options.include_usage``).

Per level: requests/s and output tokens/s over the level's wall time, percentiles
(p50/p90/p99) of TTFT, ITL, TPOT and end-to-end latency, and acceptance from the
difference of two ``/metrics`` scrapes around the level (no other client is talking to
this server). The speedup at a level is tokens/s over the target alone's at that level.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_coral.prompts import Prompt
from vllm_coral.workflows.bench.methods import MethodSpec
from vllm_coral.workflows.bench.offline import engine_plan, fill_speedups, request_seed, set_acceptance
from vllm_coral.workflows.bench.questions import conversation

__all__ = ["RequestTiming", "ServeRow", "percentiles", "run_level", "run_serve", "summarize_level"]

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    request: str
    # Seconds from sending the request.
    ttft: float
    latency: float
    output_tokens: int
    # Gaps between consecutive content chunks, in seconds.
    itl: list[float]
    text: str = ""


@dataclass
class ServeRow:
    dataset: str
    method: str
    kind: str
    temperature: float
    draft_sample_method: str | None
    speculative_config: dict | None
    concurrency: int
    requests: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    requests_per_second: float = 0.0
    tokens_per_second: float = 0.0
    speedup: float | None = None
    # {"p50": ..., "p90": ..., "p99": ..., "mean": ...} in milliseconds.
    ttft_ms: dict = field(default_factory=dict)
    itl_ms: dict = field(default_factory=dict)
    tpot_ms: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    mean_acceptance_length: float | None = None
    acceptance_per_position: list[float] = field(default_factory=list)
    draft_acceptance_rate: float | None = None
    spec_counters: dict | None = None
    startup_s: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """p50/p90/p99 and mean of ``values`` times ``scale`` (linear interpolation)."""
    if not values:
        return {}
    import numpy as np

    arr = np.asarray(values, dtype=float) * scale
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def summarize_level(row: ServeRow, timings: list[RequestTiming], seconds: float) -> None:
    row.requests = len(timings)
    row.output_tokens = sum(t.output_tokens for t in timings)
    row.seconds = seconds
    row.requests_per_second = len(timings) / seconds if seconds else 0.0
    row.tokens_per_second = row.output_tokens / seconds if seconds else 0.0
    row.ttft_ms = percentiles([t.ttft for t in timings])
    row.itl_ms = percentiles([g for t in timings for g in t.itl])
    row.tpot_ms = percentiles([(t.latency - t.ttft) / (t.output_tokens - 1) for t in timings if t.output_tokens > 1])
    row.latency_ms = percentiles([t.latency for t in timings])


async def _one_request(client, model: str, messages: list[dict], request: str, temperature: float, max_tokens: int,
                       seed: int) -> RequestTiming:  # fmt: skip
    kwargs = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True,
                  stream_options={"include_usage": True})  # fmt: skip
    if temperature > 0:
        kwargs["seed"] = request_seed(seed, request)
    start = time.perf_counter()
    ttft = None
    last = None
    gaps: list[float] = []
    parts: list[str] = []
    usage_tokens = None
    stream = await client.chat.completions.create(**kwargs)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            if ttft is None:
                ttft = now - start
            else:
                gaps.append(now - last)
            last = now
    latency = time.perf_counter() - start
    if usage_tokens is None:
        raise RuntimeError(f"request {request}: the server sent no usage (output token count)")
    return RequestTiming(request=request, ttft=ttft if ttft is not None else latency, latency=latency,
                         output_tokens=usage_tokens, itl=gaps, text="".join(parts))  # fmt: skip


async def run_level(base_url: str, model: str, prompts: list[Prompt], *, concurrency: int, temperature: float,
                    max_tokens: int, seed: int = 0, on_request=None) -> tuple[list[RequestTiming], float]:  # fmt: skip
    """All sessions at ``concurrency``; returns (timings, wall seconds)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", timeout=600.0, max_retries=0)
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    timings: list[RequestTiming] = []

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            answers: list[str] = []
            for turn in range(1, len(prompt.turns) + 1):
                request = f"{prompt.id}/turn{turn}"
                timing = await _one_request(client, model, conversation(prompt, turn, answers), request, temperature,
                                            max_tokens, seed)  # fmt: skip
                answers.append(timing.text)
                timings.append(timing)
                if on_request is not None:
                    on_request()

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    finally:
        await client.close()
    return timings, time.perf_counter() - start


def _measure_level(row: ServeRow, base: str, served_model: str, prompts: list[Prompt], *, max_tokens: int, seed: int,
                   desc: str) -> None:  # fmt: skip
    """One concurrency level against a running server: timings into ``row``, acceptance from
    the difference of two /metrics scrapes."""
    import requests
    from tqdm import tqdm

    from vllm_coral.plugin.metrics import SpecDecodeCounters

    def scrape():
        return SpecDecodeCounters.from_prometheus_text(requests.get(f"{base}/metrics", timeout=30).text)

    before = scrape()
    with tqdm(total=sum(len(p.turns) for p in prompts), desc=desc, unit="req", leave=False) as bar:
        timings, seconds = asyncio.run(run_level(base, served_model, prompts, concurrency=row.concurrency,
                                                 temperature=row.temperature, max_tokens=max_tokens, seed=seed,
                                                 on_request=bar.update))  # fmt: skip
    summarize_level(row, timings, seconds)
    if row.speculative_config is not None:
        set_acceptance(row, scrape() - before)


def run_serve(
    model: str | Path,
    specs: list[MethodSpec],
    datasets: dict[str, list[Prompt]],
    *,
    concurrencies: list[int],
    temperature: float = 0.0,
    draft_sample_methods: list[str] = ("greedy",),
    max_tokens: int = 128,
    seed: int = 0,
    dtype: str = "float32",
    log_dir: Path,
    log=print,
) -> list[ServeRow]:
    """One server per (method, draft sampling mode); every dataset at every concurrency."""
    from vllm_coral.workflows.bench.server import ServerError, one_line, served

    plan = engine_plan(specs, [temperature], list(draft_sample_methods))
    rows: list[ServeRow] = []
    served_model = str(model)
    for n, (spec, mode, _) in enumerate(plan, 1):
        label = spec.name + (f" ({mode})" if mode else "")
        config = spec.engine_config(mode)

        def new_row(dataset: str, c: int, **kw) -> ServeRow:
            return ServeRow(dataset=dataset, method=spec.name, kind=spec.method, temperature=temperature,
                            draft_sample_method=mode, speculative_config=config, concurrency=c, **kw)  # fmt: skip

        wanted = [(d, c) for d in datasets for c in concurrencies]
        if spec.error:
            log(f"[{n}/{len(plan)}] {label}: skipped: {spec.error}")
            rows += [new_row(d, c, error=spec.error) for d, c in wanted]
            continue
        log(f"[{n}/{len(plan)}] {label}: starting vllm serve ...")
        slug = "".join(ch if ch.isalnum() else "-" for ch in label).strip("-").lower()
        start = time.perf_counter()
        done: set[tuple[str, int]] = set()
        try:
            with served(model, log_dir / f"serve-{n:02d}-{slug}.log", speculative_config=config, dtype=dtype,
                        seed=seed) as base:  # fmt: skip
                startup = time.perf_counter() - start
                log(f"    healthy at {base} after {startup:.0f} s")
                warm = Prompt(id="warmup", turns=(next(iter(datasets.values()))[0].turns[0],))
                asyncio.run(run_level(base, served_model, [warm], concurrency=1, temperature=0.0, max_tokens=4))
                for dataset, prompts in datasets.items():
                    for c in concurrencies:
                        row = new_row(dataset, c, startup_s=startup)
                        _measure_level(row, base, served_model, prompts, max_tokens=max_tokens, seed=seed,
                                       desc=f"{label} · {dataset} c={c}")  # fmt: skip
                        rows.append(row)
                        done.add((dataset, c))
                        log(f"    {dataset} c={c}: {row.requests_per_second:.2f} req/s, {row.tokens_per_second:.1f} tok/s, "
                            f"TTFT p50 {row.ttft_ms.get('p50', 0):.0f} ms"
                            + (f", τ {row.mean_acceptance_length:.2f}" if row.mean_acceptance_length else ""))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a failed method is reported, the run goes on
            error = str(e) if isinstance(e, ServerError) else f"serving failed: {one_line(e)}"
            log(f"    {label}: {error}")
            if spec.method == "none":
                raise ServerError(f"the target alone failed, nothing to compare with: {error}") from e
            rows += [new_row(d, c, error=error) for d, c in wanted if (d, c) not in done]
    fill_speedups(rows, key=lambda r: (r.dataset, r.concurrency))
    return rows
