"""Nothing that cannot be captured in a CUDA graph is ever captured.

Every implementation says whether a graph may capture it (``OpDef.is_graph_safe``); a program prepared for
GPU steps (``Program.for_gpu_steps``) runs tuned choices where they are safe and each op's GPU default
elsewhere; the executor only captures steps whose implementations are all safe; the autotuner never chooses
an unsafe candidate. On the CPU these are checked on the choices (Triton under the interpreter); on a GPU,
``bench/gpu_acceptance.py`` captures with ``torch.cuda.set_sync_debug_mode("error")``.
"""

import pytest
import torch

from conftest import prefill_then_decode
from workbench.graph.executor import DEFAULTS, Program
from workbench.kernels.autotune import TimingCache, TunedChoices, autotune, tactic_ops
from workbench.kernels.registry import REFERENCE, REGISTRY
from workbench.runtime.engine import LLMEngine
from workbench.runtime.sampling import SamplingParams
from workbench.runtime.scheduler import SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
tactic_ops()  # registers the Triton tactics

FUSED = ("workbench.rms_norm", "workbench.add_rms_norm", "workbench.silu_mul", "workbench.paged_attention")


def ops_of(program, impl: str) -> set[str]:
    """Ops of the nodes that run implementation ``impl`` in the first plan."""
    names = program.implementations()
    return {n.op for n in program.graph.nodes if names[n.name] == impl}


def test_reference_paged_attention_reads_the_host_and_is_not_graph_safe():
    opdef = REGISTRY.get("workbench.paged_attention")
    assert not opdef.is_graph_safe(REFERENCE) and opdef.is_graph_safe("triton")
    assert opdef.default_impl() == ("triton", [])
    # ATen ops that read values on the host are never captured; the rest are
    assert not REGISTRY.get("aten.nonzero.default").is_graph_safe(REFERENCE)
    assert not REGISTRY.get("aten.item.default").is_graph_safe(REFERENCE)
    assert REGISTRY.get("aten.index_select.default").is_graph_safe(REFERENCE)
    assert REGISTRY.get("aten.embedding.default").is_graph_safe(REFERENCE)


def test_untuned_program_gets_safe_gpu_defaults(tiny_program):
    gpu = tiny_program.for_gpu_steps()
    assert gpu.unsafe_nodes() == []
    assert ops_of(tiny_program, REFERENCE) >= set(FUSED)  # the CPU program runs the references
    triton = ops_of(gpu, "triton")
    assert set(FUSED) <= triton  # the GPU program, the Triton kernels
    assert not ops_of(gpu, REFERENCE) & set(FUSED)


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int8_wo"])
def test_quantized_programs_get_safe_gpu_defaults(tiny_program, tiny_stats, fmt):
    from workbench.quant import PrecisionPlan, quantized_program

    plan = PrecisionPlan.uniform(tiny_program.graph, fmt, kv_cache="fp8" if fmt == "fp8" else "bf16")
    gpu = quantized_program(tiny_program, plan, tiny_stats).for_gpu_steps()
    assert gpu.unsafe_nodes() == []
    quantized = {n.op for n in gpu.graph.nodes if n.op.endswith("_linear") and n.op.startswith("workbench.")}
    assert quantized and all(gpu.implementations()[n.name] != REFERENCE
                             for n in gpu.graph.nodes if n.op in quantized)


def test_a_tuned_unsafe_choice_is_replaced_by_the_safe_default(tiny_program):
    attn = [n.name for n in tiny_program.graph.nodes if n.op == "workbench.paged_attention"]
    norm = next(n.name for n in tiny_program.graph.nodes if n.op == "workbench.rms_norm")
    # tuned elsewhere (or by an older tuner): the reference attention, and a Triton config for one norm
    config = REGISTRY.get("workbench.rms_norm").tactics["triton"].configs[0]
    tuned = TunedChoices([8], [{**{a: (REFERENCE, None) for a in attn}, norm: ("triton", config)}])
    gpu = tiny_program.with_choices(tuned).for_gpu_steps()
    names = gpu.implementations(8)
    assert all(names[a] == "triton" for a in attn) and names[norm] == "triton"
    assert gpu.unsafe_nodes() == []
    assert any("paged_attention: reference is not CUDA-graph safe, running triton" in line for line in gpu.notes)


def test_for_gpu_steps_keeps_choices_given_as_one_mapping(tiny_program):
    norm = next(n.name for n in tiny_program.graph.nodes if n.op == "workbench.rms_norm")
    config = REGISTRY.get("workbench.rms_norm").tactics["triton"].configs[-1]
    gpu = tiny_program.with_choices({norm: ("triton", config)}).for_gpu_steps()
    assert gpu._plans[0][[n.name for n in gpu.graph.nodes].index(norm)][1].keywords == {"config": config}


def test_for_gpu_steps_keeps_the_results(tiny_program):
    gpu = tiny_program.for_gpu_steps()
    for step in prefill_then_decode(tiny_program):
        cache_ref = {k: v.clone() for k, v in step.items()}
        (want,) = tiny_program.run(**cache_ref)
        (got,) = gpu.run(**step)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_step_with_an_unsafe_op_runs_eagerly(tiny_program, monkeypatch):
    """An op nobody declared graph-safe and with no safe tactic (a plugin op, say) keeps its steps eager."""
    opdef = REGISTRY.get("workbench.silu_mul")
    monkeypatch.setattr(opdef, "gpu_defaults", ())
    monkeypatch.setattr(opdef, "graph_safe", False)
    gpu = Program(tiny_program.graph, tiny_program.params, tactics=DEFAULTS, graph_safe=True)
    unsafe = gpu.unsafe_nodes()
    assert unsafe and all(gpu.graph.node(n).op == "workbench.silu_mul" for n in unsafe)
    engine = LLMEngine(gpu, num_blocks=16, config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=2),
                       emulate_graphs=True, graph_token_sizes=(16, 32))
    assert any("run eagerly" in line for line in engine.executor.notes)
    engine.add_request("a", list(range(5, 17)), SamplingParams(max_tokens=3, temperature=0))
    while engine.has_unfinished:
        engine.step()
    assert engine.executor.replays == 0 and len(engine.output("a").token_ids) == 3


def test_the_same_program_with_safe_ops_replays_its_steps(tiny_program):
    gpu = Program(tiny_program.graph, tiny_program.params, tactics=DEFAULTS, graph_safe=True)
    engine = LLMEngine(gpu, num_blocks=16, config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=2),
                       emulate_graphs=True, graph_token_sizes=(16, 32))
    engine.add_request("a", list(range(5, 17)), SamplingParams(max_tokens=3, temperature=0))
    while engine.has_unfinished:
        engine.step()
    assert engine.executor.replays == 3


def test_autotuner_never_chooses_an_unsafe_candidate(tiny_program, tmp_path):
    """The reference paged attention is timed fastest here, and still not chosen. The planted timings decide alone:
    the candidates are not run (test_autotune's first test runs every one of them on these same two steps)."""

    def timer(call, op, tactic, config):
        return 0.1 if tactic == REFERENCE else 1.0

    choices = autotune(tiny_program, prefill_then_decode(tiny_program), TimingCache.open(tmp_path / "t.json"),
                       timer=timer, progress=False)
    for name, (tactic, _) in choices.items():
        op = tiny_program.graph.node(name).op
        assert tactic == (REFERENCE if REGISTRY.get(op).graph_safe else "triton"), (name, op, tactic)
    assert any(tiny_program.graph.node(n).op == "workbench.paged_attention" for n in choices)


def test_the_build_log_names_gpu_kernel_fallbacks(tmp_path, capsys):
    """An FP8 lm_head over a vocabulary that is not a multiple of 16 cannot run torch._scaled_mm (the FP8 linear's
    first GPU default): `workbench build` says, in one line, that the GPU runs the next default there."""
    import json

    from workbench.cli import main
    from workbench.models.presets import PRESETS

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**PRESETS["tiny-llama"], "vocab_size": 501}))
    plan = tmp_path / "plan.json"
    assert main(["build", str(config), "--precision", "fp8", "--out", str(tmp_path / "e"), "--samples", "4",
                 "--seq-len", "32", "--device", "cpu"]) == 0
    assert "GPU kernels:" not in capsys.readouterr().out  # lm_head stays bf16 in a uniform plan: nothing falls back
    from workbench.quant import PrecisionPlan
    from workbench.workspace import Workspace

    ws = Workspace(tmp_path / "e.workspace")
    edited = PrecisionPlan.loads(ws.path("quant", "plan.json").read_text()).with_format("lm_head", "fp8", edited=True)
    plan.write_text(edited.dumps())
    assert main(["quantize", str(ws.root), "--plan", str(plan), "--samples", "4", "--seq-len", "32",
                 "--device", "cpu"]) == 0
    assert main(["build", str(config), "--precision", "fp8", "--out", str(tmp_path / "e"), "--samples", "4",
                 "--seq-len", "32", "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    assert ("GPU kernels: workbench.fp8_linear: tactic scaled_mm skipped (torch._scaled_mm needs K and N to be "
            "multiples of 16, got K=64, N=501)") in log
