"""Build a vLLM offline engine with sensible CPU settings and time generation runs.

Everything that runs the target through ``vllm.LLM`` (the demo, data generation, the
offline benchmark, the integration tests) goes through ``open_llm`` and ``timed_chat``, so
the engine settings and the way tokens/s and acceptance are measured are the same
everywhere.

Callers must guard their entry point with ``if __name__ == "__main__":``: vLLM spawns
its engine-core and worker processes, which re-import ``__main__``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_coral.plugin.metrics import SpecDecodeCounters
from vllm_coral.plugin.phases import ENV as PHASE_ENV
from vllm_coral.plugin.phases import PhaseTimes, create_phase_file, read_phases

__all__ = ["ChatRun", "continuous_generate", "engine_kwargs", "open_llm", "quiet_vllm_logs", "sampling_params",
           "timed_chat"]

# A chat conversation in OpenAI message form: [{"role": "user", "content": "..."}, ...].
Conversation = list[dict[str, str]]


def quiet_vllm_logs() -> None:
    """vLLM logs every engine start in every process (~60 INFO and ~12 WARNING lines per
    engine on CPU, none of them about the run), which drowns the demo's and the
    benchmark's own tables. Set before vLLM is imported, ``VLLM_LOGGING_LEVEL=ERROR``
    reaches the engine-core and worker processes too; a value the user set wins
    (``VLLM_LOGGING_LEVEL=INFO vllm-coral demo`` brings everything back)."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def sampling_params(**kwargs: Any) -> Any:
    """``vllm.SamplingParams(**kwargs)``, so that callers above the plugin never import vLLM."""
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def continuous_generate(
    llm: Any,
    next_request: Callable[[], tuple[str, list[int], Any] | None],
    on_finished: Callable[[str, Any], None],
    max_in_flight: int,
) -> None:
    """Keep up to ``max_in_flight`` requests running in the engine until ``next_request``
    runs dry and all have finished.

    ``next_request()`` returns (key, prompt token ids, SamplingParams) or None (nothing to
    add now); ``on_finished(key, completion)`` gets each finished request's first
    completion (``.text``, ``.token_ids``, ``.finish_reason``) and may make new requests
    available, e.g. a conversation's next turn. Unlike one ``llm.chat`` call per batch, a
    finished request's slot is refilled at the next engine step, so the batch never
    drains while its longest request finishes (continuous batching, as ``vllm serve``)."""
    engine = llm.llm_engine
    keys: dict[str, str] = {}
    counter = 0

    def refill() -> None:
        nonlocal counter
        while len(keys) < max_in_flight:
            request = next_request()
            if request is None:
                return
            key, prompt_ids, params = request
            counter += 1
            # outputs carry the id given here; add_request returns vLLM's internal one (+ a suffix)
            engine.add_request(f"vllm-coral-{counter}", {"prompt_token_ids": prompt_ids}, params)
            keys[f"vllm-coral-{counter}"] = key

    refill()
    while keys:
        for out in engine.step():
            if out.finished and out.request_id in keys:
                on_finished(keys.pop(out.request_id), out.outputs[0])
        if keys and not engine.has_unfinished_requests():
            raise RuntimeError(f"vLLM finished every request but {len(keys)} never reported back")
        refill()


def engine_kwargs(
    model: str | Path,
    *,
    speculative_config: dict[str, Any] | None = None,
    dtype: str = "auto",
    max_model_len: int = 2048,
    enforce_eager: bool = True,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``.

    ``enforce_eager`` defaults to True: on a 2-core CPU torch.compile adds ~2 minutes to
    start-up for ~1.4x decode speed, the wrong trade for tests and short runs. Stats
    logging is on because acceptance is read from vLLM's metrics. ``dtype="auto"`` keeps
    vLLM's choice, which the plugin's ``cpu_prefer_fp32`` patch makes fp32 on CPUs
    without native bf16.
    """
    kwargs: dict[str, Any] = dict(
        model=str(model),
        dtype=dtype,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        seed=seed,
        disable_log_stats=False,
    )
    if speculative_config is not None:
        kwargs["speculative_config"] = dict(speculative_config)
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def open_llm(**kwargs: Any) -> Iterator[Any]:
    """``vllm.LLM(**kwargs)`` that is shut down on exit, so the next one gets the cores.

    Yields the LLM; its start-up time in seconds is stored as ``llm.vllm_coral_startup_s``
    and the file its engine adds the time of each step phase to (:mod:`.phases`) as
    ``llm.vllm_coral_phase_file``.
    """
    from vllm import LLM

    with tempfile.TemporaryDirectory(prefix="vllm-coral-phases-") as tmp:
        phase_file = create_phase_file(Path(tmp) / "phases.bin")
        start = time.perf_counter()
        with _environ(PHASE_ENV, str(phase_file)):
            llm = LLM(**kwargs)
        llm.vllm_coral_startup_s = time.perf_counter() - start
        llm.vllm_coral_phase_file = phase_file
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (processes started there inherit it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass
class ChatRun:
    # [num_prompts][num_output_tokens] generated token ids, in prompt order.
    token_ids: list[list[int]]
    # [num_prompts] decoded text.
    texts: list[str]
    # Wall-clock seconds of the generate call alone.
    seconds: float
    # Acceptance counted during this run only (zeros without speculation).
    spec: SpecDecodeCounters = field(default_factory=SpecDecodeCounters)
    # [num_prompts][prompt_len] the chat-templated prompt tokens, in prompt order.
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    # Engine time per step phase during this run only (empty if the engine has no phase file).
    phases: PhaseTimes = field(default_factory=PhaseTimes)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.num_output_tokens / self.seconds if self.seconds > 0 else 0.0


def timed_chat(
    llm: Any,
    conversations: Sequence[Conversation],
    sampling_params: Any,
    *,
    warmup: bool = True,
    batch_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> ChatRun:
    """Run ``llm.chat`` on the conversations and measure it.

    ``sampling_params`` is one ``SamplingParams`` for all, or a list with one per
    conversation (per-request seeds). All conversations go in one call (vLLM batches them
    all at once) unless ``batch_size`` is given: then they run in consecutive calls of
    that many, which is what a server at that concurrency sees; ``on_chunk(n)`` is called
    after each call with the number of conversations it finished. ``warmup`` first runs
    one short request so one-time costs (first-call allocations, lazy imports in the
    workers) stay out of the timing; its acceptance is excluded too.
    """
    from vllm import SamplingParams

    if warmup:
        llm.chat([list(conversations[0])], SamplingParams(max_tokens=4), use_tqdm=False)
    per_request = isinstance(sampling_params, (list, tuple))
    if per_request and len(sampling_params) != len(conversations):
        raise ValueError(f"{len(sampling_params)} sampling params for {len(conversations)} conversations")
    before = SpecDecodeCounters.from_metrics(llm.get_metrics())
    phases_before = _phases(llm)
    start = time.perf_counter()
    step = batch_size or len(conversations)
    outputs = []
    for i in range(0, len(conversations), step):
        chunk = [list(c) for c in conversations[i : i + step]]
        params = list(sampling_params[i : i + step]) if per_request else sampling_params
        outputs += llm.chat(chunk, params, use_tqdm=False)
        if on_chunk is not None:
            on_chunk(len(chunk))
    seconds = time.perf_counter() - start
    spec = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
    phases = _phases(llm) - phases_before
    return ChatRun(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        texts=[o.outputs[0].text for o in outputs],
        seconds=seconds,
        spec=spec,
        prompt_token_ids=[list(o.prompt_token_ids or []) for o in outputs],
        phases=phases,
    )


def _phases(llm: Any) -> PhaseTimes:
    path = getattr(llm, "vllm_coral_phase_file", None)
    return read_phases(path) if path is not None else PhaseTimes()
