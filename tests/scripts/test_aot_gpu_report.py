"""The pure parts of scripts/aot_gpu_report.py: HLO parsing and the roofline time model.

A hand-written optimized-HLO module (a GEMM fusion, a while loop of known trip count whose body
holds two loop fusions and a dynamic-update-slice fusion into a stacked buffer, and a cuDNN
custom call) is costed and checked against counts, bytes and FLOPs worked out here from the
shapes. Runs in the project venv, which has no jax CUDA plugin: nothing here compiles.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "aot_gpu_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("aot_gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


aot = _load()

M, K, N = 64, 128, 32  # the entry GEMM: bf16 [M, K] x [K, N]
TRIP = 4  # while-loop trip count = leading dim of the stacked buffer
R, C = 16, 128  # one layer of the stacked f32 buffer

HLO = f"""HloModule jit_step, is_scheduled=true

%fused_dot (p0: bf16[{M},{K}], p1: bf16[{K},{N}]) -> bf16[{M},{N}] {{
  %p0 = bf16[{M},{K}]{{1,0}} parameter(0)
  %p1 = bf16[{K},{N}]{{1,0}} parameter(1)
  ROOT %dot.1 = bf16[{M},{N}]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, \
rhs_contracting_dims={{0}}, metadata={{op_name="jit(step)/dot_general"}}
}}

%fused_add (q0: f32[{R},{C}]) -> f32[{R},{C}] {{
  %q0 = f32[{R},{C}]{{1,0}} parameter(0)
  ROOT %add.3 = f32[{R},{C}]{{1,0}} add(%q0, %q0)
}}

%fused_convert (c0: f32[{R},{C}]) -> bf16[{R},{C}] {{
  %c0 = f32[{R},{C}]{{1,0}} parameter(0)
  ROOT %convert.4 = bf16[{R},{C}]{{1,0}} convert(%c0)
}}

%fused_dus (r0: f32[{TRIP},{R},{C}], r1: bf16[{R},{C}], r2: s32[]) -> f32[{TRIP},{R},{C}] {{
  %r0 = f32[{TRIP},{R},{C}]{{2,1,0}} parameter(0)
  %r1 = bf16[{R},{C}]{{1,0}} parameter(1)
  %r2 = s32[] parameter(2)
  %convert.5 = f32[{R},{C}]{{1,0}} convert(%r1)
  %bitcast.6 = f32[1,{R},{C}]{{2,1,0}} bitcast(%convert.5)
  %zero.7 = s32[] constant(0)
  ROOT %dynamic-update-slice.8 = f32[{TRIP},{R},{C}]{{2,1,0}} dynamic-update-slice(%r0, \
%bitcast.6, %r2, %zero.7, %zero.7)
}}

%cond (w0: (s32[], f32[{R},{C}], f32[{TRIP},{R},{C}])) -> pred[] {{
  %w0 = (s32[], f32[{R},{C}]{{1,0}}, f32[{TRIP},{R},{C}]{{2,1,0}}) parameter(0)
  %wi = s32[] get-tuple-element(%w0), index=0
  %limit = s32[] constant({TRIP})
  ROOT %lt = pred[] compare(%wi, %limit), direction=LT
}}

%body (b0: (s32[], f32[{R},{C}], f32[{TRIP},{R},{C}])) -> (s32[], f32[{R},{C}], \
f32[{TRIP},{R},{C}]) {{
  %b0 = (s32[], f32[{R},{C}]{{1,0}}, f32[{TRIP},{R},{C}]{{2,1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%b0), index=0
  %x = f32[{R},{C}]{{1,0}} get-tuple-element(%b0), index=1
  %stack = f32[{TRIP},{R},{C}]{{2,1,0}} get-tuple-element(%b0), index=2
  %loop_add_fusion.1 = f32[{R},{C}]{{1,0}} fusion(%x), kind=kLoop, calls=%fused_add
  %loop_convert_fusion.2 = bf16[{R},{C}]{{1,0}} fusion(%loop_add_fusion.1), kind=kLoop, \
calls=%fused_convert
  %loop_dynamic_update_slice_fusion.3 = f32[{TRIP},{R},{C}]{{2,1,0}} fusion(%stack, \
%loop_convert_fusion.2, %i), kind=kLoop, calls=%fused_dus
  ROOT %out = (s32[], f32[{R},{C}]{{1,0}}, f32[{TRIP},{R},{C}]{{2,1,0}}) tuple(%i, \
%loop_add_fusion.1, %loop_dynamic_update_slice_fusion.3)
}}

ENTRY %main (a: bf16[{M},{K}], b: bf16[{K},{N}], x0: f32[{R},{C}], s0: f32[{TRIP},{R},{C}], \
q: bf16[2,8,4,16]) -> bf16[{M},{N}] {{
  %a = bf16[{M},{K}]{{1,0}} parameter(0)
  %b = bf16[{K},{N}]{{1,0}} parameter(1)
  %x0 = f32[{R},{C}]{{1,0}} parameter(2)
  %s0 = f32[{TRIP},{R},{C}]{{2,1,0}} parameter(3)
  %q = bf16[2,8,4,16]{{3,2,1,0}} parameter(4)
  %gemm_fusion_dot.7 = bf16[{M},{N}]{{1,0}} fusion(%a, %b), kind=kCustom, calls=%fused_dot, \
backend_config={{"fusion_backend_config":{{"kind":"__triton_nested_gemm_fusion"}}}}
  %zero = s32[] constant(0)
  %init = (s32[], f32[{R},{C}]{{1,0}}, f32[{TRIP},{R},{C}]{{2,1,0}}) tuple(%zero, %x0, %s0)
  %while.5 = (s32[], f32[{R},{C}]{{1,0}}, f32[{TRIP},{R},{C}]{{2,1,0}}) while(%init), \
condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"{TRIP}"}}}}
  %fmha.9 = (bf16[2,8,4,16]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%q, %q, %q), \
custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %r = bf16[{M},{N}]{{1,0}} copy(%gemm_fusion_dot.7)
}}
""".replace("\\\n", "")

GEMM_FLOPS = 2 * M * N * K
LAYER_F32 = R * C * 4
# Per step: the GEMM fusion, the custom call, the ROOT copy, and 3 fusions x TRIP iterations.
KERNELS = 3 + 3 * TRIP


def test_parse_hlo_finds_entry_computations_and_operands():
    entry, comps = aot.parse_hlo(HLO)
    assert entry == "main"
    fused = {"fused_dot", "fused_add", "fused_convert", "fused_dus"}
    assert set(comps) == fused | {"cond", "body", "main"}
    (dus,) = [i for i in comps["body"] if i.name == "loop_dynamic_update_slice_fusion.3"]
    assert dus.op == "fusion"
    assert dus.operands == ("stack", "loop_convert_fusion.2", "i")
    (fmha,) = [i for i in comps["main"] if i.op == "custom-call"]
    assert fmha.type.startswith("(bf16[2,8,4,16]")


def test_kernel_count_and_trip_count_multiplication():
    cost = aot.model_cost(HLO, launch_us=0.0)
    assert cost.kernels == KERNELS
    add = cost.categories["loop_add_fusion"]
    assert add[0] == TRIP
    assert add[2] == TRIP * 2 * LAYER_F32  # reads x, writes x + x, every iteration
    # The launch overhead is charged once per launched kernel.
    slower = aot.model_cost(HLO, launch_us=3.0)
    assert slower.seconds - cost.seconds == pytest.approx(KERNELS * 3e-6, rel=1e-9)


def test_dot_flops_and_roofline():
    peak, bandwidth = 1e9, 1e15  # compute bound by construction
    cost = aot.model_cost(HLO, bandwidth=bandwidth, peak=peak, launch_us=0.0)
    assert cost.flops == GEMM_FLOPS
    n, seconds, nbytes, flops = cost.categories["GEMM:gemm_fusion_dot"]
    assert (n, flops) == (1, GEMM_FLOPS)
    assert nbytes == 2 * (M * K + K * N + M * N)
    assert seconds == pytest.approx(GEMM_FLOPS / peak, rel=1e-12)
    assert dict(cost.gemm_dtypes) == {"bf16xbf16->bf16": 1}


def test_dynamic_update_slice_moves_only_the_update():
    cost = aot.model_cost(HLO, launch_us=0.0)
    n, _, nbytes, flops = cost.categories["loop_dynamic_update_slice_fusion"]
    update_bytes = R * C * 2 + 4  # the bf16 update and the s32 index, not the f32 stack
    assert (n, flops) == (TRIP, 0)
    assert nbytes == TRIP * 2 * update_bytes
    assert nbytes < TRIP * TRIP * LAYER_F32  # far below rewriting the whole stack


def test_custom_calls_counted_with_bytes_only():
    cost = aot.model_cost(HLO, launch_us=0.0)
    assert dict(cost.custom_calls) == {"__cudnn$fmhaSoftmax": 1}
    n, _, nbytes, flops = cost.categories["fmha"]
    assert (n, flops) == (1, 0)
    assert nbytes == 4 * 2 * 8 * 4 * 16 * 2  # three operands + one result of bf16[2,8,4,16]


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="no ENTRY"):
        aot.model_cost(HLO.replace("ENTRY ", ""))


def test_importing_the_script_does_not_import_jax():
    code = (
        "import importlib.util, sys; "
        f"s = importlib.util.spec_from_file_location('m', {str(SCRIPT)!r}); "
        "m = sys.modules['m'] = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_plugin_exits_2_naming_the_requirements(capsys, monkeypatch):
    if not aot._missing_wheels():
        pytest.skip("this interpreter has the jax CUDA plugin and ptxas")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert aot.main(["--size", "small"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "scripts/aot_gpu_requirements.txt" in err[0] and "make aot-report" in err[0]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--train-groups", "4"], "--train-groups"),  # the train step has no length groups
        (["--program", "runs", "--method", "full", "--train-groups", "2"], "--train-groups"),
        (["--program", "runs", "--runs", "0"], "--runs"),
        (["--program", "runs", "--num-runs", "0"], "--num-runs"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exit_:
        aot.main(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]
