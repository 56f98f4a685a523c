"""Coming from the seed repository: its network, layer for layer, checked against the reference's facts."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.config import CONFIG_DIR
from diffusion.engine.checkpoint import load_weights
from diffusion.models import SeedUNet
from diffusion.process.generate import generate
from diffusion.process.samplers import image_generators, randn_per_image
from diffusion.process.schedules import LinearSchedule
from diffusion.weights.trained_model import load_trained
from tests.conftest import cli

REFERENCE_KEYS = Path(__file__).parent / "data" / "seed_unet_state_dict.txt"


def reference_state_dict() -> list[tuple[str, tuple[int, ...]]]:
    """The seed's state-dict keys and shapes, in order, as the reference lists them."""
    rows = [line.split("\t") for line in REFERENCE_KEYS.read_text().splitlines() if not line.startswith("#")]
    return [(key, tuple(int(n) for n in shape.strip("(),").split(",") if n.strip())) for key, shape, _ in rows]


def test_seed_unet_has_the_seeds_keys_shapes_and_parameter_count():
    model = SeedUNet()
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == reference_state_dict()
    assert sum(p.numel() for p in model.parameters()) == 23_334_531
    assert model.num_classes is None and model.null_label is None and (model.image_size, model.in_channels) == (64, 3)


def seed_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, time_dim: int, training: bool) -> torch.Tensor:
    """The network as the reference describes it, written with functional ops on the state dict alone."""

    def group_norm(h, prefix):
        return F.group_norm(h, 1, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def double_conv(h, prefix, residual=False):
        out = F.gelu(group_norm(F.conv2d(h, sd[f"{prefix}.double_conv.0.weight"], padding=1), f"{prefix}.double_conv.1"))
        out = group_norm(F.conv2d(out, sd[f"{prefix}.double_conv.3.weight"], padding=1), f"{prefix}.double_conv.4")
        return F.gelu(h + out) if residual else out

    def plus_embedding(h, prefix, emb):
        return h + F.linear(F.silu(emb), sd[f"{prefix}.emb_layer.1.weight"], sd[f"{prefix}.emb_layer.1.bias"])[..., None, None]

    def down(h, prefix, emb):
        h = double_conv(double_conv(F.max_pool2d(h, 2), f"{prefix}.maxpool_conv.1", True), f"{prefix}.maxpool_conv.2")
        return plus_embedding(h, prefix, emb)

    def up(h, skip, prefix, emb):
        h = torch.cat([skip, F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)], dim=1)
        return plus_embedding(double_conv(double_conv(h, f"{prefix}.conv.0", True), f"{prefix}.conv.1"), prefix, emb)

    def layer_norm(h, prefix):
        return F.layer_norm(h, h.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def attention(h, prefix, heads=4):
        b, c, height, width = h.shape
        tokens = h.reshape(b, c, -1).transpose(1, 2)
        normed = layer_norm(tokens, f"{prefix}.ln")
        q, k, v = F.linear(normed, sd[f"{prefix}.mha.in_proj_weight"], sd[f"{prefix}.mha.in_proj_bias"]).chunk(3, -1)
        q, k, v = (z.reshape(b, -1, heads, c // heads).transpose(1, 2) for z in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, -1, c)
        a = F.linear(attended, sd[f"{prefix}.mha.out_proj.weight"], sd[f"{prefix}.mha.out_proj.bias"]) + tokens
        f = F.linear(layer_norm(a, f"{prefix}.ff_self.0"), sd[f"{prefix}.ff_self.1.weight"], sd[f"{prefix}.ff_self.1.bias"])
        f = F.linear(layer_norm(f, f"{prefix}.ff_self.2"), sd[f"{prefix}.ff_self.3.weight"], sd[f"{prefix}.ff_self.3.bias"])
        return (f + a).transpose(1, 2).reshape(b, c, height, width)

    # the seed's position table: row t = [sin(t w_0), cos(t w_0), sin(t w_1), ...], w_i = exp(-ln(10000) 2i / dim)
    steps = torch.arange(1000, dtype=torch.float32)[:, None]
    w = torch.exp(-math.log(10000.0) * torch.arange(0, time_dim, 2, dtype=torch.float32) / time_dim)
    table = torch.zeros(1000, time_dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(steps * w), torch.cos(steps * w)
    emb = F.dropout(table[t], p=0.1, training=training)
    x1 = double_conv(x, "input_conv")
    x2 = attention(down(x1, "down1", emb), "sa1")
    x3 = attention(down(x2, "down2", emb), "sa2")
    x4 = attention(down(x3, "down3", emb), "sa3")
    x4 = double_conv(double_conv(double_conv(x4, "bottleneck1"), "bottleneck2"), "bottleneck3")
    h = attention(up(x4, x3, "up1", emb), "sa4")
    h = attention(up(h, x2, "up2", emb), "sa5")
    h = attention(up(h, x1, "up3", emb), "sa6")
    return F.conv2d(h, sd["out_conv.weight"], sd["out_conv.bias"])


@pytest.mark.slow
@pytest.mark.parametrize("base_channels, time_dim, size", [(8, 32, 16), (64, 256, 64)], ids=["reduced", "seed"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last, attention", [(True, "sdpa"), (False, "sdpa"), (False, "seed")],
                         ids=["channels_last", "contiguous", "seed_attention"])
def test_seed_unet_computes_what_the_reference_describes(base_channels, time_dim, size, training, channels_last,
                                                         attention):
    torch.manual_seed(0)
    model = SeedUNet(image_size=size, base_channels=base_channels, time_dim=time_dim, channels_last=channels_last,
                     attention=attention).train(training)
    for parameter in model.parameters():  # GroupNorm and LayerNorm start at 1 and 0: give every weight a value
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    x, t = torch.randn(2, 3, size, size), torch.tensor([1, 499])
    sd = {key: value.detach() for key, value in model.state_dict().items()}
    with torch.no_grad():
        torch.manual_seed(1)
        expected = seed_forward(sd, x, t, time_dim, training)
        torch.manual_seed(1)  # the same dropout mask on the time embedding in train mode
        got = model(x, t)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    if training:  # the time embedding's dropout is live: another mask gives another output
        torch.manual_seed(2)
        with torch.no_grad():
            assert (model(x, t) - got).abs().max() > 1e-3


def test_a_file_in_the_seeds_format_loads_strictly_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    seed_model = SeedUNet(image_size=16, base_channels=8, time_dim=32)
    optimizer = torch.optim.Adam(seed_model.parameters(), lr=3e-4)
    seed_model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7])).square().mean().backward()
    optimizer.step()
    torch.save({"epoch": 61, "state_dict": seed_model.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "cars_61_4000.pt")
    state = torch.load(tmp_path / "cars_61_4000.pt", map_location="cpu", weights_only=True)
    model = SeedUNet(image_size=16, base_channels=8, time_dim=32)
    load_weights(model, state["state_dict"], what="seed weights")  # strict: raises on any missing or unexpected key
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 250, 499])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t), seed_model.eval()(x, t), atol=0, rtol=0)


def test_seed_unet_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="model=seed_unet is the seed's unconditional network; got model.num_classes=10"):
        SeedUNet(num_classes=10)
    with pytest.raises(ValueError, match=r"model.attention='flash' is not known; choose one of \['sdpa', 'seed'\]"):
        SeedUNet(attention="flash")
    with pytest.raises(ValueError, match=r"so 20x20 does not fit: use an image size divisible by 8"):
        SeedUNet(image_size=20)
    with pytest.raises(ValueError, match="model=seed_unet is unconditional"):
        SeedUNet(image_size=16, base_channels=8, time_dim=32)(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1))


def test_the_seed_sampler_visits_t_from_T_minus_1_to_1_and_follows_the_seeds_update():
    """x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z, with z = 0 at t = 1."""
    schedule = LinearSchedule(50)
    visited = []

    def stub(x_t, t):  # a network predicting eps = 0.3 x_t + 0.01 t, as the denoiser interface returns it
        visited.append(int(t[0]))
        eps = 0.3 * x_t + 0.01 * t.float().view(-1, 1, 1, 1)
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        return (x_t - sigma * eps) / alpha, eps

    sampler = instantiate(OmegaConf.load(Path(CONFIG_DIR, "sampler", "seed_ddpm.yaml")))
    generators = image_generators([5, 6])
    out = sampler(stub, randn_per_image(torch.empty(2, 3, 4, 4), generators), schedule, generators)
    assert visited == list(range(49, 0, -1))
    beta, alpha, abar = (v.double() for v in (schedule.betas, schedule.alphas, schedule.alphas_cumprod))
    generators = image_generators([5, 6])
    x = randn_per_image(torch.empty(2, 3, 4, 4), generators).double()
    for t in range(49, 0, -1):
        eps = 0.3 * x + 0.01 * t
        noise = randn_per_image(x, generators).double() if t > 1 else torch.zeros_like(x)
        x = (x - beta[t] / (1 - abar[t]).sqrt() * eps) / alpha[t].sqrt() + beta[t].sqrt() * noise
    torch.testing.assert_close(out.double(), x, atol=1e-4, rtol=1e-4)
    assert x.abs().max() > 1  # unclipped: the clamp to [-1, 1] is the caller's (generate), as in the seed


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    """A file in the seed's format from the full seed network with random weights, as the seed's trainer saves it."""
    torch.manual_seed(0)
    model = SeedUNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    path = tmp_path_factory.mktemp("seed") / "cars_61_4000.pt"
    torch.save({"epoch": 61, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path, model.eval()


def test_a_seed_file_is_rebuilt_from_the_seed_recipe_with_the_t_the_user_gives(seed_file):
    path, seed_model = seed_file
    trained = load_trained(path, seed_format={"recipe": "seed_cars64", "noise_steps": 20})
    assert isinstance(trained.model, SeedUNet) and trained.weights == "the seed file's" and trained.chosen.name == "raw" and trained.state["converted_from"] == "seed"
    assert trained.schedule.num_timesteps == 20 and trained.state["epoch"] == 61
    torch.testing.assert_close(trained.schedule.betas.double(), torch.linspace(1e-4, 0.02, 20, dtype=torch.float64))
    assert trained.objective.loss_name == "huber"  # the seed's smooth-L1 loss, for fine-tuning
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([7])
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x, t), seed_model(x, t), atol=0, rtol=0)
    for sampler in ("ddim", "dpmpp_2m"):  # every sampler runs a seed file
        cfg = OmegaConf.load(Path(CONFIG_DIR, "sampler", f"{sampler}.yaml"))
        images = generate(trained.model, trained.schedule, trained.objective, instantiate(cfg, steps=2), [0, 1],
                          (3, 64, 64), batch_size=2)
        assert torch.isfinite(images).all() and images.std() > 0.01
    with pytest.raises(ValueError, match="seed_format.recipe='cars' is not a recipe of the seed"):
        load_trained(path, seed_format={"recipe": "cars", "noise_steps": 20})


@pytest.mark.slow
def test_diffusion_sample_samples_a_seed_file_with_the_seeds_own_sampler(seed_file, tmp_path):
    path, _ = seed_file
    result = cli("sample", f"checkpoint={path}", "sampler=seed_ddpm", "seed_format.noise_steps=6", "num_images=2",
                 f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    assert "a checkpoint in the seed repository's format (epoch 61, no config)" in result.stdout + result.stderr
    [grid] = tmp_path.glob("sample/*/grid.png")
    assert len(list(grid.parent.glob("images/*.png"))) == 2


@pytest.mark.slow
def test_a_converted_seed_file_samples_the_same_images(seed_file, tmp_path):
    path, _ = seed_file
    cli("convert", f"checkpoint={path}", "seed_format.noise_steps=20", f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    [converted] = tmp_path.glob("convert/*/cars_61_4000.pt")
    state = torch.load(converted, weights_only=True)
    assert state["format_version"] == 2 and state["epoch"] == 61 and "seed_optimizer" in state
    sampler = instantiate(OmegaConf.load(Path(CONFIG_DIR, "sampler", "ddim.yaml")), steps=3)
    images = []
    for checkpoint in (path, converted):
        trained = load_trained(checkpoint, seed_format={"recipe": "seed_cars64", "noise_steps": 20})
        images.append(generate(trained.model, trained.schedule, trained.objective, sampler, [3, 4], (3, 64, 64)))
    torch.testing.assert_close(images[0], images[1], atol=0, rtol=0)
    again = cli("convert", f"checkpoint={converted}", f"paths.runs_dir={tmp_path}", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "a checkpoint of this platform needs no conversion" in again.stdout


def test_the_seed_recipe_draws_training_timesteps_from_1_to_T_minus_1():
    from tests.conftest import compose_config

    cfg = compose_config("train", ["experiment=seed_cars64", "dataset.root=unused", "schedule.num_timesteps=4"])
    objective, schedule = instantiate(cfg.objective), instantiate(cfg.schedule)
    t = objective.draw(schedule, (4000, 1, 2, 2), torch.device("cpu"), torch.Generator().manual_seed(0)).t
    assert sorted(t.unique().tolist()) == [1, 2, 3]
    assert objective.loss_name == "huber" and cfg.model._target_ == "diffusion.models.SeedUNet"
    objective.min_timestep = 4
    with pytest.raises(ValueError, match=r"objective.min_timestep=4 must lie in \[0, 3\]"):
        objective.draw(schedule, (2, 1, 2, 2), torch.device("cpu"))


# debug=smoke with the seed's recipe: its network at 8 base channels (conf/debug_model/smoke_seed_unet.yaml)
SMALL_SEED_RUN = ["debug=smoke", "logger=none"]


def image_folder(root: Path, count: int = 8) -> Path:
    """A folder of 64x64 RGB images, as the seed's data sets are."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (30 * i, 200 - 20 * i, 90)).save(root / f"{i}.png")
    return root


def test_fine_tuning_starts_from_a_seed_files_weights_and_adam_moments(tmp_path):
    from diffusion.cli.train import train
    from diffusion.engine.checkpoint import load_checkpoint
    from tests.conftest import compose_config

    torch.manual_seed(123)  # not the run's seed: a run from scratch starts elsewhere
    seed_model = SeedUNet(image_size=16, base_channels=8, time_dim=32)
    optimizer = torch.optim.Adam(seed_model.parameters(), lr=3e-4)
    for _ in range(3):  # the seed trained it: three Adam steps
        optimizer.zero_grad()
        seed_model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7])).square().mean().backward()
        optimizer.step()
    torch.save({"epoch": 5, "state_dict": seed_model.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "cars_5_0.pt")
    data = image_folder(tmp_path / "data")
    run = compose_config("train", ["experiment=seed_cars64", f"dataset.root={data}", *SMALL_SEED_RUN,
                                   "trainer.max_steps=2", f"init_from={tmp_path / 'cars_5_0.pt'}"], tmp_path / "run")
    train(run)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    steps = {int(entry["step"]) for entry in state["optimizer"]["state"].values()}
    assert steps == {3 + 2}  # Adam continued the seed's moments: 3 of its steps, then 2 of this run
    fresh = compose_config("train", ["experiment=seed_cars64", f"dataset.root={data}", *SMALL_SEED_RUN,
                                     "trainer.max_steps=2"], tmp_path / "fresh")
    train(fresh)
    scratch = load_checkpoint(tmp_path / "fresh" / "checkpoints" / "last.pt")
    start = seed_model.state_dict()
    # two small steps from the seed's weights stay near them; a run from scratch does not
    near = max((state["model"][k] - start[k]).abs().max().item() for k in start)
    far = max((scratch["model"][k] - start[k]).abs().max().item() for k in start)
    assert near < 0.01 < far


def test_the_seed_recipe_trains_seed_unet_under_the_engine_with_debug_smoke(tmp_path):
    from diffusion.cli.train import train
    from diffusion.engine.checkpoint import load_checkpoint
    from tests.conftest import compose_config

    cfg = compose_config("train", ["experiment=seed_cars64", f"dataset.root={image_folder(tmp_path / 'data')}",
                                   *SMALL_SEED_RUN], tmp_path / "run")
    result = train(cfg)
    assert result["step"] == 4 and result["loss"] > 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "diffusion.models.SeedUNet" in state["config"] and "min_timestep: 1" in state["config"]
    assert set(state["ema"]["state_dict"]) == {key for key, _ in reference_state_dict()}
    assert (tmp_path / "run" / "samples" / "step_4.png").is_file()
