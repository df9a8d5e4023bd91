"""core/precision.py: the one precision policy. What "auto" resolves to per device and mode, explicit requests
honoured or refused, the switches' "auto" resolved (not truthy), training and the Runner taking their settings from
the policy, and that the fp32 path gives the same results in channels_last as in NCHW (losses and gradients of a
real TransformerNet + PerceptualLoss step)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch

from core import precision as P
from core.errors import FaststyleError
from models.loss import PerceptualLoss, gram_matrix
from models.transformer import TransformerNet
from training.loop import RunOutputs, RunRecord, Trainer, TrainOptions, fit

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
MPS = torch.device("mps")
has_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# device, training, native bf16 (on the GPU; on the CPU the instructions detected) -> (precision, grad scaler,
# channels_last, compile): the module's table.
AUTO_TABLE = [
    (CPU, True, None, ("fp32", False, False, False)),
    (CPU, False, None, ("fp32", False, True, False)),
    (CPU, True, "AMX", ("bf16", False, True, False)),
    (CPU, False, "AVX512-BF16", ("bf16", False, True, False)),
    (CUDA, True, True, ("bf16", False, True, True)),
    (CUDA, True, False, ("fp16", True, True, True)),
    (CUDA, False, True, ("fp16", False, True, False)),
    (CUDA, False, False, ("fp16", False, True, False)),
    (MPS, True, None, ("fp32", False, False, False)),
    (MPS, False, None, ("fp32", False, True, False)),
]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Decide the CUDA rows without a GPU, and the CPU rows whatever this machine's CPU: the capability probes
    answer what the test sets ("cpu": the bf16 instructions the CPU detection reports, None by default)."""
    state = {"bf16": True, "cpu": None}
    monkeypatch.setattr(P, "cuda_supports_bf16", lambda device: state["bf16"])
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: state["cpu"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return state


@pytest.mark.parametrize(
    ("device", "training", "bf16", "expected"),
    AUTO_TABLE,
    ids=[f"{d.type}-{'train' if t else 'stylize'}-{b}" for d, t, b, _ in AUTO_TABLE],
)
def test_auto_per_device_and_mode(
    fake_gpu: dict, device: torch.device, training: bool, bf16: bool | str | None, expected: tuple
) -> None:
    fake_gpu["bf16"] = bool(bf16)
    fake_gpu["cpu"] = bf16 if isinstance(bf16, str) else None
    policy = P.resolve_precision(device, "auto", "auto", "auto", training=training)
    assert (policy.name, policy.use_grad_scaler, policy.channels_last, policy.compile) == expected
    assert policy.dtype is {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[policy.name]
    assert (policy.device_type, policy.training) == (device.type, training)
    # Training keeps fp32 weights (autocast); inference casts the network, so its activations shrink.
    assert policy.tensor_dtype is (torch.float32 if training or policy.dtype is None else policy.dtype)
    assert policy.activation_bytes_factor == (1.0 if policy.tensor_dtype is torch.float32 else 0.5)


def test_cpu_auto_follows_the_detected_hardware_and_says_why(fake_gpu: dict) -> None:
    for hardware, name, reason in ((None, "fp32", "no native bf16 on this CPU"), ("AMX", "bf16", "AMX detected")):
        fake_gpu["cpu"] = hardware
        for training in (True, False):
            policy = P.resolve_precision(CPU, "auto", training=training)
            assert (policy.name, policy.reason) == (name, reason)
            assert policy.describe().startswith(f"precision: {name} (auto: {reason}), channels_last: ")
            # An explicit request is the user's: no "auto" reason, and fp32 stays available everywhere.
            assert P.resolve_precision(CPU, "fp32", training=training).describe().startswith("precision: fp32, ")


def test_explicit_requests_are_honoured_or_refused(
    fake_gpu: dict, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for training in (True, False):
        assert P.resolve_precision(CPU, "fp32", training=training).dtype is None
        with pytest.raises(FaststyleError, match=r"^precision=fp16 needs a CUDA device \(device is cpu\)"):
            P.resolve_precision(CPU, "fp16", training=training)
        with pytest.raises(FaststyleError, match="fp16 needs a CUDA"):
            P.resolve_precision(MPS, "fp16", training=training)
        with pytest.raises(FaststyleError, match="not supported on MPS"):
            P.resolve_precision(MPS, "bf16", training=training)
        with pytest.raises(FaststyleError, match="use one of auto, fp32, fp16, bf16"):
            P.resolve_precision(CPU, "half", training=training)
        fp16 = P.resolve_precision(CUDA, "fp16", training=training)
        assert fp16.dtype is torch.float16 and fp16.use_grad_scaler is training
        fake_gpu["bf16"] = False
        with pytest.raises(FaststyleError, match="Fake GPU"):
            P.resolve_precision(CUDA, "bf16", training=training)
        fake_gpu["bf16"] = True
        assert P.resolve_precision(CUDA, "bf16", training=training).dtype is torch.bfloat16
    bf16 = P.resolve_precision(CPU, "bf16", training=True)  # allowed when asked for; warns where it is emulated
    assert bf16.dtype is torch.bfloat16 and not bf16.use_grad_scaler
    for native in (False, True):
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="core.precision"):
            P.configure_backends(bf16)
        assert ("slower" in caplog.text) is not native


def test_native_bf16_is_read_from_the_cpu_flags_and_the_onednn_cap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import builtins

    real_open = builtins.open
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cases = (
        ("fpu avx2 fma", None, None),
        ("fpu avx512f avx512_bf16", None, "AVX512-BF16"),
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", None, "AMX"),
        # ONEDNN_MAX_CPU_ISA limits what oneDNN may use: below AVX512_CORE_BF16 its bf16 is emulated.
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AVX2", None),
        ("fpu avx512f avx512_bf16", "avx512_core", None),
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AVX512_CORE_BF16", "AVX512-BF16"),
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AVX512_CORE_AMX", "AMX"),
    )
    for flags, cap, expected in cases:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")

        def fake_open(path, *args, cpuinfo=cpuinfo, **kwargs):
            return real_open(cpuinfo if str(path) == "/proc/cpuinfo" else path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert P.cpu_bf16_hardware() == expected, (flags, cap)
        assert P.cpu_has_native_bf16() is (expected is not None)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # no oneDNN: nothing is native
    assert P.cpu_bf16_hardware() is None


@pytest.mark.parametrize("training", [True, False])
def test_switch_strings_are_resolved_not_truthy(training: bool) -> None:
    """ "auto" (a non-empty string, so truthy) must become the table's bool; quoted "true"/"false" count as bools."""
    for device in (CPU, CUDA, MPS):
        policy = P.resolve_precision(device, "fp32", "auto", "auto", training=training)
        auto = P.auto_switches(device.type, training, "fp32")
        assert (policy.channels_last, policy.compile) == (auto["channels_last"], auto["compile"])
    policy = P.resolve_precision(CPU, "fp32", "false", "False", training=training)
    assert (policy.channels_last, policy.compile) == (False, False)
    assert P.resolve_precision(CPU, "fp32", True, "true", training=training).compile is True
    with pytest.raises(FaststyleError, match="compile='sometimes' is not valid: use auto, true or false"):
        P.resolve_precision(CPU, "fp32", False, "sometimes", training=training)


def test_train_options_take_auto_from_the_policy(fake_gpu: dict) -> None:
    options = TrainOptions(steps=1, channels_last="auto", compile="auto")
    options.validate()
    # CPU training rows: NHWC only in bf16 (it slows the fp32 step down); never compiled
    for hardware, expected in ((None, ("fp32", False, False)), ("AVX512-BF16", ("bf16", True, False))):
        fake_gpu["cpu"] = hardware
        policy = options.precision_policy(CPU)
        assert policy.training and (policy.name, policy.channels_last, policy.compile) == expected


def test_configure_backends_and_the_log_line(
    fake_gpu: dict, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    fake_gpu["cpu"] = "AMX"
    with caplog.at_level(logging.INFO, logger="core.precision"):
        P.configure_backends(P.resolve_precision(CPU, "auto", "auto", "auto", training=False))
    assert caplog.messages == ["precision: bf16 (auto: AMX detected), channels_last: on, compile: off (cpu, stylize)"]
    assert torch.backends.cudnn.benchmark is False  # CPU: nothing to configure
    gpu = P.PrecisionPolicy("fp16", torch.float16, True, True, False, "cuda", training=True)
    assert gpu.describe() == "precision: fp16 + loss scaling, channels_last: on, compile: off (cuda, train)"
    P.configure_backends(gpu)
    assert torch.backends.cudnn.benchmark is True  # one crop size: the autotuning is paid once


def test_inference_policy_casts_the_network_and_inputs() -> None:
    half = P.PrecisionPolicy("fp16", torch.float16, False, True, False, "cpu", training=False)
    net = half.prepare_module(torch.nn.Conv2d(3, 8, 3))
    assert net.weight.dtype is torch.float16 and net.weight.is_contiguous(memory_format=torch.channels_last)
    batch = half.batch_to(torch.rand(2, 3, 8, 8), CPU)
    assert batch.dtype is torch.float16 and batch.is_contiguous(memory_format=torch.channels_last)
    with half.autocast():  # inference runs the cast network, without autocast
        assert not torch.is_autocast_enabled("cpu")
    train = P.resolve_precision(CPU, "fp32", True, False, training=True)
    double = train.prepare_module(torch.nn.Conv2d(3, 8, 3).double())
    assert double.weight.dtype is torch.float64  # training keeps the module's dtype
    assert train.batch_to(torch.rand(1, 3, 4, 4, dtype=torch.float64), CPU).dtype is torch.float64


def _tiny_run() -> tuple[TransformerNet, PerceptualLoss, torch.Tensor]:
    torch.manual_seed(0)
    model = TransformerNet(base_width=8, residual_blocks=1)
    loss = PerceptualLoss("random", ["relu1_2"], {"relu1_2": 1.0}, 1.0, 1.0, 0.0)
    photos = torch.rand(2, 3, 32, 32)
    loss.set_style(photos[:1])
    return model, loss, photos


def _recording_resolve(monkeypatch: pytest.MonkeyPatch, **forced: bool) -> list[dict]:
    """Replace the policy's resolve: record each call, and force ``forced`` fields into the result."""
    calls: list[dict] = []
    real = P.resolve_precision

    def resolve(device: torch.device, *args: object, **kwargs: object) -> P.PrecisionPolicy:
        calls.append({"device": device, "args": args, **kwargs})
        policy = real(device, *args, **kwargs)
        return P.PrecisionPolicy(**{**policy.__dict__, **forced})

    monkeypatch.setattr(P, "resolve_precision", resolve)
    return calls


def test_fit_takes_its_settings_from_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recording_resolve(monkeypatch, channels_last=True)  # the options say false: the policy decides
    seen: list[torch.Tensor] = []
    model, loss, photos = _tiny_run()
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    options = TrainOptions(steps=1, precision="fp32", channels_last=False, compile="auto")
    outputs = RunOutputs(tmp_path, options.steps, 0)
    try:
        fit(
            model,
            loss,
            itertools.repeat(photos),
            options,
            CPU,
            outputs,
            RunRecord(photos[:1], photos),
        )
    finally:
        outputs.close()
    assert calls == [{"device": CPU, "args": ("fp32", False, "auto"), "training": True}]
    assert model.encoder[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)


def _stylize_cfg(**values: object):
    from omegaconf import OmegaConf

    base = {
        "precision": "auto",
        "channels_last": "auto",
        "compile": "auto",
        "max_memory_mb": 2048,
        "tmp_dir": None,
        "preserve_color": False,
        "strength": 1.0,
    }
    return OmegaConf.create({**base, **values})


def test_runner_takes_its_settings_from_the_policy(fake_gpu: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.runner import Runner

    reference = Runner.from_module(TransformerNet(base_width=8, residual_blocks=1), CPU, _stylize_cfg())
    assert reference.policy == P.resolve_precision(CPU, "auto", "auto", False, training=False)
    assert reference.net.encoder[0].conv.weight.is_contiguous(memory_format=torch.channels_last)  # stylize auto: on
    calls = _recording_resolve(monkeypatch, channels_last=False, name="fp16", dtype=torch.float16)
    runner = Runner.from_module(
        TransformerNet(base_width=8, residual_blocks=1), CPU, _stylize_cfg(channels_last="auto")
    )
    assert calls == [{"device": CPU, "args": ("auto", "auto", "auto"), "training": False}]
    weight = runner.net.encoder[0].conv.weight
    assert weight.dtype is torch.float16 and not weight.is_contiguous(memory_format=torch.channels_last)
    # The memory estimate follows the policy's dtype (half-size activations fit about twice the images) and its
    # layout (channels-last keeps fewer bytes per pixel alive on the fused CPU path).
    from inference.memory import untiled_bytes_estimate

    nchw_full = int(reference.budget_mb * 2**20 // untiled_bytes_estimate(runner.net, 512, 512, channels_last=False))
    assert nchw_full >= 1 and abs(runner.max_batch(512, 512) - 2 * nchw_full) <= 1
    assert reference.max_batch(512, 512) > nchw_full


def test_runner_refuses_what_stylize_cannot_run() -> None:
    from inference.runner import Runner

    net = TransformerNet(base_width=8, residual_blocks=1)
    with pytest.raises(FaststyleError, match=r"^precision=fp16 needs a CUDA device \(device is cpu\)"):
        Runner.from_module(net, CPU, _stylize_cfg(precision="fp16"))
    assert Runner.from_module(net, CPU, _stylize_cfg(channels_last="false")).policy.channels_last is False  # not truthy
    bf16 = Runner.from_module(
        net, CPU, _stylize_cfg(precision="bf16")
    )  # the network is cast: inference has no autocast
    assert bf16.policy.name == "bf16" and bf16.net.encoder[0].conv.weight.dtype is torch.bfloat16


def test_runner_runs_onnx_models_in_fp32(fake_gpu: dict) -> None:
    """onnxruntime computes in float32: a 16-bit input would only round the photo. auto gives fp32 even where the
    CPU has native bf16; an explicit 16-bit request is refused."""
    from inference.runner import Runner

    class OnnxLike:  # what interop.onnx_model.OnnxStyleModel offers the Runner: not an nn.Module
        def eval(self) -> OnnxLike:
            return self

        def to(self, *args: object, **kwargs: object) -> OnnxLike:
            return self

    fake_gpu["cpu"] = "AMX"
    assert Runner.from_module(OnnxLike(), CPU, _stylize_cfg()).policy.name == "fp32"
    with pytest.raises(FaststyleError, match=r"^precision=bf16: \.onnx models run in fp32"):
        Runner.from_module(OnnxLike(), CPU, _stylize_cfg(precision="bf16"))


def test_fp32_policy_is_a_pass_through() -> None:
    policy = P.resolve_precision(CPU, "fp32", training=True)
    scaler = policy.grad_scaler()
    assert not scaler.is_enabled()
    loss = torch.tensor(3.0, requires_grad=True)
    assert scaler.scale(loss) is loss  # a disabled scaler changes nothing
    with policy.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_gram_stays_fp32_under_bf16_autocast() -> None:
    """Gram matrices overflow in fp16 and lose digits in bf16: the loss module keeps them in fp32."""
    features = torch.rand(2, 8, 16, 16) * 100
    with P.resolve_precision(CPU, "bf16", training=True).autocast():
        gram = gram_matrix(features.bfloat16())
    assert gram.dtype is torch.float32
    torch.testing.assert_close(gram, gram_matrix(features.bfloat16().float()))


def _loss_and_grads(
    channels_last: bool, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and parameter gradients of one step of a tiny TransformerNet against the random loss network."""
    policy = P.resolve_precision(CPU, "fp32", channels_last, False, training=True)
    torch.manual_seed(0)
    net = policy.prepare_module(TransformerNet(base_width=8, residual_blocks=2).to(dtype))
    loss_fn = policy.prepare_module(
        PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 1.0}, 1.0, 10.0, 1.0).to(dtype)
    )
    gen = torch.Generator().manual_seed(3)
    loss_fn.set_style(policy.batch_to(torch.rand(1, 3, 64, 64, generator=gen).to(dtype), CPU))
    batch = policy.batch_to(torch.rand(2, 3, 64, 64, generator=gen).to(dtype), CPU)
    assert batch.is_contiguous(memory_format=torch.channels_last) is channels_last
    losses = loss_fn(net(batch), batch)
    losses["total"].backward()
    return (
        {k: v.detach().double() for k, v in losses.items()},
        {n: p.grad.double() for n, p in net.named_parameters()},
    )


def test_channels_last_fp32_matches_nchw() -> None:
    """channels_last changes only the order of float32 sums, so its results must be as accurate as NCHW's.

    The reference is the same step in float64: fp32 gradients of this deep, high-gain (random VGG) loss are
    themselves only good to ~2e-3 of each tensor's scale, and the conv biases in front of an instance norm have a
    true gradient of exactly zero (the norm removes the mean), so a plain NCHW-vs-NHWC comparison would test noise.
    """
    losses_64, grads_64 = _loss_and_grads(channels_last=False, dtype=torch.float64)
    losses_a, grads_a = _loss_and_grads(channels_last=False)
    losses_b, grads_b = _loss_and_grads(channels_last=True)
    assert losses_a.keys() == losses_b.keys() == losses_64.keys()
    for key in losses_a:
        torch.testing.assert_close(losses_b[key], losses_a[key], rtol=1e-4, atol=1e-6)
    global_scale = max(g.abs().max().item() for g in grads_64.values())
    for name, ref in grads_64.items():
        err_nchw = (grads_a[name] - ref).abs().max().item()
        err_cl = (grads_b[name] - ref).abs().max().item()
        bound = max(3 * err_nchw, 5e-3 * ref.abs().max().item()) + 1e-6 * global_scale
        assert err_cl <= bound, (name, err_cl, err_nchw)


@has_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cuda_mixed_precision_step_close_to_fp32(name: str) -> None:
    """On a GPU, fit's own step under AMP + channels_last: the first step's losses stay within a few percent of
    fp32's, and the weights stay finite over a few steps (with fp16 the GradScaler skips the steps whose scaled
    gradients overflowed, so gradients themselves may be inf)."""
    if name == "bf16" and not P.cuda_supports_bf16(CUDA):
        pytest.skip("GPU without native bf16")
    results = {}
    for precision, channels_last in (("fp32", False), (name, True)):
        torch.manual_seed(0)
        net = TransformerNet(base_width=16, residual_blocks=2)
        loss_fn = PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 1.0}, 1.0, 10.0, 1.0).to(CUDA)
        gen = torch.Generator().manual_seed(3)
        loss_fn.set_style(torch.rand(1, 3, 128, 128, generator=gen).to(CUDA))
        options = TrainOptions(steps=5, precision=precision, channels_last=channels_last)
        trainer = Trainer(net, loss_fn, options, CUDA)
        assert trainer.policy.name == precision and trainer.scaler.is_enabled() is (precision == "fp16")
        batch = trainer.to_device(torch.rand(4, 3, 128, 128, generator=gen))
        first = trainer.step(1, batch)
        assert first["total"].dtype is torch.float32
        results[precision] = {k: v.item() for k, v in first.items()}
        for step in range(2, options.steps + 1):
            trainer.step(step, batch)
        assert all(torch.isfinite(p).all() for p in net.parameters())
    for key, value in results["fp32"].items():
        assert results[name][key] == pytest.approx(value, rel=0.05, abs=1e-6), key


def test_precision_names_and_dtypes_map_both_ways() -> None:
    assert set(P.PRECISION_DTYPES) == set(P.PRECISIONS) - {"auto"}
    for name, dtype in P.PRECISION_DTYPES.items():
        assert P.precision_name(dtype) == name
    cpu = torch.device("cpu")
    assert P.resolve_precision(cpu, "fp32", "auto", False, training=False).dtype is None  # fp32: nothing is cast


def _documented_auto_table() -> list[list[str]]:
    """The rows of docs/architecture.md's "Precision policy" table: device, run, precision, channels_last, compile."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    section = text[text.index("## Precision policy") :]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]  # after the header row


def test_the_documented_precision_table_is_what_auto_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table is written once, in docs/architecture.md: every row must be what resolve_precision gives."""
    from core import precision

    rows = _documented_auto_table()
    assert len(rows) >= 9
    for device_text, run, precision_text, channels_last_text, compile_text in rows:
        kind = next(kind for kind in ("cpu", "cuda", "mps") if kind in device_text)
        native = "native bf16" in device_text and not device_text.startswith("other")
        monkeypatch.setattr(precision, "cpu_bf16_hardware", lambda native=native: "AVX512-BF16" if native else None)
        for new_gpu in [True, False] if "any" in device_text else ["Ampere" in device_text]:
            monkeypatch.setattr(precision, "cuda_supports_bf16", lambda device, new_gpu=new_gpu: new_gpu)
            policy = precision.resolve_precision(torch.device(kind), training=run == "train")
            got = (policy.name, policy.channels_last, policy.compile)
            want = (precision_text.split()[0].rstrip(":"), channels_last_text == "on", compile_text.startswith("on"))
            assert got == want, f"docs row {device_text} / {run}: documented {want}, resolved {got}"
