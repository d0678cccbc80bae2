"""Image and multimodal tasks on tiny models, without Ray: losses, gradients, learning, ZeRO-3 call order, export."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from raypt.config import AudioConfig, ImageConfig, ModelConfig
from raypt.tasks import mae, multimodal

TEXT = {"vocab_size": 64, "seq_len": 12, "eos_id": 0}  # 12 text tokens vs 16 image patches: text rows get padded
MANIFESTS = {"text": TEXT, "image": {}, "audio": {}}


def job() -> SimpleNamespace:
    model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, patch_size=4, decoder_hidden_size=32,
                        decoder_layers=1)
    image = ImageConfig(size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    audio = AudioConfig(sample_rate=1600, seconds=1.0, n_mels=8, hop=90)  # 17 frames: 4 tokens + 1 dropped
    return SimpleNamespace(run=SimpleNamespace(seed=0), model=model,
                           data=SimpleNamespace(image=image, audio=audio))


def images(n: int, seed: int = 0) -> torch.Tensor:
    """A random texture per image, repeating every 4x4 patch, so the patches seen predict the others."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g).repeat(1, 1, 4, 4)


def batch(text: int, image: int, audio: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, TEXT["vocab_size"], (text, TEXT["seq_len"]), generator=g),
            "pixel_values": images(image, seed), "audio_features": torch.randn(audio, 8, 17, generator=g)}


def train(task, model: torch.nn.Module, data: dict, steps: int = 30, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, data).backward()
        opt.step()


def seeded_loss(task, model: torch.nn.Module, data: dict, seed: int = 1) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        return task.loss(model, data).item()


def test_mae_learns_and_exports_a_transformers_folder(tmp_path):
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    cfg = job()
    model = mae.build_model(cfg, {"image": {}}, seed=0)
    data = {"pixel_values": images(8)}
    loss = mae.loss(model, data)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    views = {"pixel_values": torch.stack([data["pixel_values"], images(8, seed=1)], 1)}  # [rows, 2, 3, S, S]
    assert seeded_loss(mae, model, views) == seeded_loss(mae, model, data)  # the first view is the one used

    before = seeded_loss(mae, model, data)
    train(mae, model, data)
    after = seeded_loss(mae, model, data)
    assert after < 0.7 * before, (before, after)

    mae.export(model, cfg, {"image": {}}, str(tmp_path))
    loaded = ViTMAEForPreTraining.from_pretrained(str(tmp_path))
    assert seeded_loss(mae, loaded, data) == pytest.approx(after, abs=1e-6)
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = (pixels / 255.0 - np.array(cfg.data.image.mean)) / np.array(cfg.data.image.std)
    got = processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
    np.testing.assert_allclose(got.numpy(), expected.transpose(2, 0, 1), atol=1e-5)  # the training normalisation


def test_multimodal_loss_is_the_row_weighted_mean_with_grads_everywhere():
    model = multimodal.build_model(job(), MANIFESTS, seed=0)
    full = batch(2, 3, 1)
    loss = multimodal.loss(model, full)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        alone = {m: multimodal.loss(model, {key: full[key]}) for m, key in multimodal.KEYS.items()}
        assert loss.item() == pytest.approx(float(2 * alone["text"] + 3 * alone["image"] + alone["audio"]) / 6,
                                            rel=1e-5)
        # Zero-row modalities widen the padded trunk input (12 -> 16 positions) but cannot change the text loss.
        no_images = {**batch(2, 0, 0), "input_ids": full["input_ids"]}
        assert multimodal.loss(model, no_images).item() == pytest.approx(alone["text"].item(), rel=1e-5)

    model.zero_grad()
    multimodal.loss(model, batch(2, 0, 1)).backward()  # image key present with 0 rows: still a (zero) gradient
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() == 0 for p in (*model.embed["image"].parameters(), *model.head["image"].parameters()))

    model.zero_grad()
    text_only = multimodal.loss(model, {"input_ids": full["input_ids"]})  # a run without images and audio
    text_only.backward()
    assert torch.isfinite(text_only) and model.embed["text"].weight.grad is not None
    assert model.head["audio"].weight.grad is None


def called_modules(model: torch.nn.Module, data: dict) -> list[str]:
    calls: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
             for name, module in model.named_modules()]
    multimodal.loss(model, data).backward()
    for hook in hooks:
        hook.remove()
    return calls


def test_multimodal_calls_every_module_in_one_order_whatever_the_rows():
    """ZeRO-3 gathers parameters in forward order: ranks with different row counts must call the same modules."""
    model = multimodal.build_model(job(), MANIFESTS, seed=0)
    full = called_modules(model, batch(2, 3, 1))
    with_params = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert with_params <= set(full)
    assert called_modules(model, batch(4, 0, 0)) == full
    assert called_modules(model, batch(0, 0, 0)) == full  # an empty micro-batch: one padded row, weight 0
    assert multimodal.loss(model, batch(0, 0, 0)).item() == 0.0


def test_multimodal_learns_exports_and_counts_flops(tmp_path):
    cfg = job()
    model = multimodal.build_model(cfg, MANIFESTS, seed=0)
    data = batch(4, 4, 4)
    before = seeded_loss(multimodal, model, data)
    train(multimodal, model, data)
    after = seeded_loss(multimodal, model, data)
    assert after < 0.7 * before, (before, after)

    multimodal.export(model, cfg, MANIFESTS, str(tmp_path))
    assert seeded_loss(multimodal, multimodal.load(str(tmp_path)), data) == pytest.approx(after, abs=1e-6)

    assert [multimodal.tokens_per_sample(cfg, MANIFESTS, m) for m in multimodal.MODALITIES] == [12, 16, 4]
    layer_matmuls = sum(m.weight.numel() for m in model.trunk.modules() if isinstance(m, torch.nn.Linear))
    for m in multimodal.MODALITIES:
        n = multimodal.tokens_per_sample(cfg, MANIFESTS, m)
        heads = model.head[m].weight.numel() + (0 if m == "text" else model.embed[m].weight.numel())
        expected = 6 * (layer_matmuls + heads) * n + 12 * 2 * 32 * n * n
        assert multimodal.flops_per_sample(model, cfg, m) == expected


def test_half_precision_models_take_float32_batches():
    """DeepSpeed's bf16 engine leaves float32 pixels and mel features as they come."""
    for task, manifests, data in ((mae, {"image": {}}, {"pixel_values": images(2)}),
                                  (multimodal, MANIFESTS, batch(1, 1, 1))):
        model = task.build_model(job(), manifests, seed=0).to(torch.bfloat16)
        loss = task.loss(model, data)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
