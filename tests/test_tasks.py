"""Image and multimodal tasks on tiny models, without Ray: losses, gradients, learning, ZeRO-3 call order, export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raypt import config
from raypt.config import ConfigError, JobConfig
from raypt.data.features import BATCH_KEY
from raypt.tasks import MODALITIES, TASKS, Task, clm, contrastive, get_task, llama, mae, multimodal

TEXT = {"vocab_size": 64, "seq_len": 12, "eos_id": 0}  # 12 text tokens vs 16 image patches: text rows get padded
MANIFESTS = {"text": TEXT, "image": {}, "audio": {}}


def job(task: str) -> JobConfig:
    sizes = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}
    own = {"clm": {}, "mae": {"patch_size": 4, "decoder_hidden_size": 32, "decoder_layers": 1},
           "multimodal": {"patch_size": 4}}[task]
    image = {"size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    audio = {"sample_rate": 1600, "seconds": 1.0, "n_mels": 8, "hop": 90}  # 17 frames: 4 tokens + 1 dropped
    return config.from_dict({"model": {"task": task, **sizes, **own}, "data": {"image": image, "audio": audio}})


def mae_task() -> mae.MaeTask:
    return mae.MaeTask(job("mae"), {"image": {}})


def multimodal_task() -> multimodal.MultimodalTask:
    return multimodal.MultimodalTask(job("multimodal"), MANIFESTS)


def images(n: int, seed: int = 0) -> torch.Tensor:
    """A random texture per image, repeating every 4x4 patch, so the patches seen predict the others."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g).repeat(1, 1, 4, 4)


def batch(text: int, image: int, audio: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, TEXT["vocab_size"], (text, TEXT["seq_len"]), generator=g),
            "pixel_values": images(image, seed), "audio_features": torch.randn(audio, 8, 17, generator=g)}


def train(task: Task, model: torch.nn.Module, data: dict, steps: int = 30, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, data)[0].backward()
        opt.step()


def seeded_loss(task: Task, model: torch.nn.Module, data: dict, seed: int = 1) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        return task.loss(model, data)[0].item()


def test_one_registry_of_typed_tasks():
    assert TASKS == {"clm": clm.ClmTask, "contrastive": contrastive.ContrastiveTask, "mae": mae.MaeTask,
                     "multimodal": multimodal.MultimodalTask}
    assert MODALITIES == {"clm": ("text",), "contrastive": ("image",), "mae": ("image",),
                          "multimodal": ("text", "image", "audio")}
    assert get_task("mae") is mae.MaeTask and all(TASKS[n].Config().task == n for n in TASKS)
    with pytest.raises(ConfigError, match="model.task: got 'gpt'; allowed: clm, contrastive, mae, multimodal"):
        get_task("gpt")


def test_clm_loss_sizes_and_flops():
    cfg = job("clm")
    task = clm.ClmTask(cfg, {"text": TEXT})
    model = task.build_model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), task.build_model(seed=3).parameters()))
    ids = batch(4, 0, 0)["input_ids"]
    loss, metrics = task.loss(model, {"input_ids": ids})
    assert metrics == {} and task.metrics == ()
    assert torch.equal(loss, model(input_ids=ids, labels=ids).loss.float())
    assert task.tokens_per_sample("text") == 12
    assert model.config.intermediate_size == llama.intermediate_size(cfg.model) == 96  # 8/3 x 32, rounded to 32
    layer_matmuls = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    expected = 6 * (layer_matmuls + model.lm_head.weight.numel()) * 12 + 12 * 2 * 32 * 12 * 12
    assert task.flops_per_sample(model, "text") == expected


def test_mae_learns_and_exports_a_transformers_folder(tmp_path):
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    task = mae_task()
    model = task.build_model(seed=0)
    data = {"pixel_values": images(8), "position": torch.arange(8)}
    loss, metrics = task.loss(model, data)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and metrics == {}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    views = {"pixel_values": torch.stack([data["pixel_values"], images(8, seed=1)], 1),  # [rows, 2, 3, S, S]
             "position": data["position"]}
    assert seeded_loss(task, model, views) == seeded_loss(task, model, data)  # the first view is the one used

    before = seeded_loss(task, model, data)
    train(task, model, data)
    after = seeded_loss(task, model, data)
    assert after < 0.7 * before, (before, after)

    task.export(model, str(tmp_path))
    loaded = ViTMAEForPreTraining.from_pretrained(str(tmp_path))
    assert seeded_loss(task, loaded, data) == pytest.approx(after, abs=1e-6)
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = (pixels / 255.0 - np.array(task.cfg.data.image.mean)) / np.array(task.cfg.data.image.std)
    got = processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
    np.testing.assert_allclose(got.numpy(), expected.transpose(2, 0, 1), atol=1e-5)  # the training normalisation


def test_multimodal_loss_is_the_row_weighted_mean_with_grads_everywhere():
    task = multimodal_task()
    model = task.build_model(seed=0)
    full = batch(2, 3, 1)
    loss, metrics = task.loss(model, full)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and metrics == {}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        alone = {m: task.loss(model, {key: full[key]})[0] for m, key in BATCH_KEY.items()}
        assert loss.item() == pytest.approx(float(2 * alone["text"] + 3 * alone["image"] + alone["audio"]) / 6,
                                            rel=1e-5)
        # Zero-row modalities widen the padded trunk input (12 -> 16 positions) but cannot change the text loss.
        no_images = {**batch(2, 0, 0), "input_ids": full["input_ids"]}
        assert task.loss(model, no_images)[0].item() == pytest.approx(alone["text"].item(), rel=1e-5)

    model.zero_grad()
    task.loss(model, batch(2, 0, 1))[0].backward()  # image key present with 0 rows: still a (zero) gradient
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() == 0 for p in (*model.embed["image"].parameters(), *model.head["image"].parameters()))

    model.zero_grad()
    text_only, _ = task.loss(model, {"input_ids": full["input_ids"]})  # a run without images and audio
    text_only.backward()
    assert torch.isfinite(text_only) and model.embed["text"].weight.grad is not None
    assert model.head["audio"].weight.grad is None


def called_modules(model: torch.nn.Module, data: dict) -> list[str]:
    calls: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
             for name, module in model.named_modules()]
    multimodal_task().loss(model, data)[0].backward()
    for hook in hooks:
        hook.remove()
    return calls


def test_multimodal_calls_every_module_in_one_order_whatever_the_rows():
    """ZeRO-3 gathers parameters in forward order: ranks with different row counts must call the same modules."""
    task = multimodal_task()
    model = task.build_model(seed=0)
    full = called_modules(model, batch(2, 3, 1))
    with_params = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert with_params <= set(full)
    assert called_modules(model, batch(4, 0, 0)) == full
    assert called_modules(model, batch(0, 0, 0)) == full  # an empty micro-batch: one padded row, weight 0
    assert task.loss(model, batch(0, 0, 0))[0].item() == 0.0


def test_multimodal_learns_exports_and_counts_flops(tmp_path):
    task = multimodal_task()
    model = task.build_model(seed=0)
    data = batch(4, 4, 4)
    before = seeded_loss(task, model, data)
    train(task, model, data)
    after = seeded_loss(task, model, data)
    assert after < 0.7 * before, (before, after)

    task.export(model, str(tmp_path))
    assert seeded_loss(task, multimodal.load(str(tmp_path)), data) == pytest.approx(after, abs=1e-6)

    assert [task.tokens_per_sample(m) for m in task.modalities] == [12, 16, 4]
    layer_matmuls = sum(m.weight.numel() for m in model.trunk.modules() if isinstance(m, torch.nn.Linear))
    for m in task.modalities:
        n = task.tokens_per_sample(m)
        heads = model.head[m].weight.numel() + (0 if m == "text" else model.embed[m].weight.numel())
        expected = 6 * (layer_matmuls + heads) * n + 12 * 2 * 32 * n * n
        assert task.flops_per_sample(model, m) == expected


def test_mae_masks_are_keyed_by_each_samples_place_in_the_data():
    """Ranks hold different places, so they draw different masks; a sample's mask does not depend on which rank
    or micro-batch it lands in, so any world size draws the masks an uninterrupted run drew."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    from raypt.tasks.base import sample_noise

    task = mae_task()
    model = task.build_model(seed=0)
    patches = task.tokens_per_sample("image")
    masks = {}
    for positions in ([0, 1, 2, 3], [2, 3], [3]):
        noise = sample_noise(torch.tensor(positions), 0, patches)
        seq = torch.zeros(len(positions), patches, 1)
        _, mask, _ = ViTMAEEmbeddings.random_masking(model.vit.embeddings, seq, noise)
        masks.update({(p, len(positions)): m for p, m in zip(positions, mask)})
    assert not torch.equal(masks[(0, 4)], masks[(1, 4)])  # two places, two masks
    assert torch.equal(masks[(3, 4)], masks[(3, 2)]) and torch.equal(masks[(3, 4)], masks[(3, 1)])
    assert not torch.equal(sample_noise(torch.tensor([3]), 1, patches), sample_noise(torch.tensor([3]), 0, patches))
    image = images(1)
    one = task.loss(model, {"pixel_values": image, "position": torch.tensor([3])})[0]
    pair = task.loss(model, {"pixel_values": image.repeat(2, 1, 1, 1), "position": torch.tensor([3, 3])})[0]
    assert one.item() == pytest.approx(pair.item(), abs=1e-6)  # the mask follows the place, not the batch


def test_half_precision_models_take_float32_batches():
    """DeepSpeed's bf16 engine leaves float32 pixels and mel features as they come."""
    for task, data in ((mae_task(), {"pixel_values": images(2), "position": torch.arange(2)}),
                       (multimodal_task(), batch(1, 1, 1))):
        model = task.build_model(seed=0).to(torch.bfloat16)
        loss, _ = task.loss(model, data)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
