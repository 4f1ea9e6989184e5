"""Reward functions and prompt sets for dag.py: the paper's four tasks, plus PickScore.

Every entry of `REWARDS` is a factory `make(device) -> fn` whose closure has the signature

    fn(images: (B, 3, H, W) float in [0, 1], prompts: list[str]) -> (B,) float32 tensor on images.device

and returns the *raw* score r(x0). A model reward also sets `fn.embed(images) -> (B, d)`, its image embedding, which
dag.py uses to measure the diversity of evaluation samples. The temperature `reward_exp` is applied in dag.py only.
Heavy imports and weight loading happen inside the factories, so `import rewards` is instant and never fails for a
missing optional package.
A reward of your own needs no edit here: `--reward mypkg.module:function` imports a factory of the same shape.

The model rewards run in fp32 on the images' device, preprocess with tensor ops (no CPU image processor in the loop)
and keep the autograd graph, so they are differentiable when called with grad enabled. ImageReward and HPSv2 are
loaded into transformers' BLIP and CLIP classes from their published checkpoints: their own PyPI packages no longer
import with current libraries (see README).

`prompt_set(name) -> (train, eval)` gives the paper's prompt set of each task (`TASK_PROMPTS`) and a fixed list for
evaluation; the large ones are fetched on first use and cached.
"""

import csv
import importlib
import io
import json
import math
import os
import pickle
import re
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def need(module, pip_name):
    """Import an optional package, or fail with one line that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this reward needs `pip install {pip_name}` ({e})") from e


# --------------------------------------------------------------------------------------------------------------------
# JPEG size (DDPO's compressibility tasks)
# --------------------------------------------------------------------------------------------------------------------


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy, the rendering a user would save to disk."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images):
    """Size in kB (1000 bytes) of each image saved as a JPEG at quality 95, as in DDPO and the DAG release."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(device=None):
    """r = -(JPEG size in kB): smaller files score higher. Not differentiable."""
    return lambda images, prompts: -jpeg_size_kb(images)


def jpeg_incompressibility(device=None):
    """r = +(JPEG size in kB): busier, more detailed images score higher. Not differentiable."""
    return lambda images, prompts: jpeg_size_kb(images)


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces of the model rewards
# --------------------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, also used by BLIP/ImageReward and HPSv2
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size=224):
    """CLIPImageProcessor's resize (shorter side -> size, bicubic) + center crop + normalisation, as tensor ops.

    Runs on the images' device and keeps the graph, so the GPU never waits on a CPU image processor and the reward
    stays differentiable (the release converts every image to PIL on the CPU)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, int(h * scale)), max(size, int(w * scale))  # truncation, as transformers does
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class MLPHead(nn.Module):
    """The 5-linear MLP of the LAION aesthetic predictor and of ImageReward, laid out so that both published state
    dicts load as they are (indices 1, 3, 5 held dropout, a no-op at inference; there is no activation)."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
            nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, features):  # (B, dim) -> (B,)
        return self.layers(features).squeeze(-1)


def hub_file(repo, filename, what, env=None, repo_type=None):
    """Local path of a published file: `$env` if set, else the Hugging Face hub cache (downloading on first use)."""
    if env and os.environ.get(env):
        return os.environ[env]
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename, repo_type=repo_type)
    except Exception as e:  # noqa: BLE001 -- offline, gated, or a typo: the user needs the same sentence
        hint = f" or set {env} to a local copy" if env else ""
        raise OSError(f"cannot fetch {what} ({repo}/{filename}: {e.__class__.__name__}); download it once "
                      f"online{hint}") from e


def load_weights(module, path, what, convert=lambda state: state):
    """module.load_state_dict(convert(torch.load(path))) strictly; a file of the wrong kind is one ValueError."""
    try:
        module.load_state_dict(convert(torch.load(path, map_location="cpu", weights_only=True)))
    except (RuntimeError, KeyError, AttributeError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not {what} ({e.__class__.__name__}: {str(e)[:160]})") from e
    return module


def rename(state, rules):
    """Map checkpoint keys through (regex, replacement) rules, first match wins; keys no rule matches are dropped."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                out[new] = value
                break
    return out


def frozen(module, device):
    return module.float().to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor: CLIP ViT-L/14 image embedding -> MLP head (christophschuhmann/improved-aesthetic-predictor)
# --------------------------------------------------------------------------------------------------------------------

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"  # a public hub mirror of the LAION file


def aesthetic(device="cpu", clip_model="openai/clip-vit-large-patch14", head_path=None):
    """LAION aesthetic score (about 1-10) of the image.

    head_path: a local copy of `sac+logos+ava1-l14-linearMSE.pth`; default `$DAG_AESTHETIC_HEAD`, else the hub."""
    transformers = need("transformers", "transformers")
    head_path = head_path or hub_file(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE, "the LAION aesthetic head",
                                      "DAG_AESTHETIC_HEAD")
    clip = frozen(transformers.CLIPVisionModelWithProjection.from_pretrained(clip_model), device)
    head = frozen(load_weights(MLPHead(clip.config.projection_dim), head_path, "the LAION aesthetic head"), device)

    def embed(images):
        return clip(pixel_values=clip_preprocess(images, clip.config.image_size)).image_embeds

    def fn(images, prompts):
        embedding = embed(images)
        return head(embedding / embedding.norm(dim=-1, keepdim=True))

    fn.embed = embed
    return fn


# --------------------------------------------------------------------------------------------------------------------
# ImageReward (Xu et al. 2023): BLIP ViT-L image tokens -> BERT with cross-attention -> [CLS] -> MLP, standardised
# --------------------------------------------------------------------------------------------------------------------

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # the published score standardisation
IMAGEREWARD_RENAMES = [  # ImageReward.pt (BLIP's timm-style ViT + med.py BERT) -> transformers' BLIP modules
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision.encoder.layers.\1.layer_norm\2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.(?!embeddings\.position_ids)", "text."),  # same names in med.py and transformers
    (r"^mlp\.", "head."),
]  # everything else in the checkpoint (BLIP's decoder, projections, a position-id buffer) is not used for scoring


def imagereward_configs():
    """BLIP 'large' as ImageReward builds it: ViT-L/16 at 224 px (LayerNorm eps 1e-6, as in BLIP's ViT) and a 12-layer
    BERT with cross-attention to the 1024-wide image tokens; 30524 tokens = bert-base-uncased + BLIP's [DEC], [ENC]."""
    transformers = need("transformers", "transformers")
    vision = transformers.BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=224, patch_size=16,
                                           layer_norm_eps=1e-6, hidden_act="gelu")  # fmt: skip
    text = transformers.BlipTextConfig(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=1024,
                                       layer_norm_eps=1e-12, hidden_act="gelu")  # fmt: skip
    return vision, text


def imagereward(device="cpu", checkpoint=None, tokenizer="bert-base-uncased", configs=None, max_length=35):
    """ImageReward v1.0 score of (prompt, image), standardised by the published mean and std.

    checkpoint: `ImageReward.pt` (default `$DAG_IMAGEREWARD`, else THUDM/ImageReward on the hub). Prompts are cut at
    35 tokens, as ImageReward was trained and scores (the DAG release let them run to 512)."""
    transformers = need("transformers", "transformers")
    checkpoint = checkpoint or hub_file("THUDM/ImageReward", "ImageReward.pt", "the ImageReward checkpoint",
                                        "DAG_IMAGEREWARD")
    vision_config, text_config = configs or imagereward_configs()
    model = nn.ModuleDict({
        "vision": transformers.BlipVisionModel(vision_config),
        "text": transformers.BlipTextModel(text_config, add_pooling_layer=False),
        "head": MLPHead(text_config.hidden_size),
    })  # fmt: skip
    convert = lambda state: rename(state, IMAGEREWARD_RENAMES)  # noqa: E731 -- BLIP's timm names -> transformers'
    model = frozen(load_weights(model, checkpoint, "an ImageReward checkpoint", convert), device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)

    def vision(images):
        return model["vision"](pixel_values=clip_preprocess(images, vision_config.image_size))

    def fn(images, prompts):
        tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt").to(images.device)
        image_tokens = vision(images).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device)
        text = model["text"](input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)  # fmt: skip
        return (model["head"](text.last_hidden_state[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    fn.embed = lambda images: vision(images).last_hidden_state[:, 0]  # the [CLS] state (pooler_output is normed twice)
    return fn


# --------------------------------------------------------------------------------------------------------------------
# HPSv2 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, text)
# --------------------------------------------------------------------------------------------------------------------

OPEN_CLIP_RENAMES = [  # open_clip ViT-H-14 -> transformers CLIPModel (in_proj split and projections transposed below)
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),  # sic: transformers' spelling
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.proj$", "visual_projection.weight"),
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^text_projection$", "text_projection.weight"),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"^logit_scale$", "logit_scale"),
]
OPEN_CLIP_LAYER_RENAMES = [(".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".mlp.c_fc.", ".mlp.fc1."),
                           (".mlp.c_proj.", ".mlp.fc2."), (".attn.out_proj.", ".self_attn.out_proj.")]  # fmt: skip


def open_clip_to_transformers(state):
    """An open_clip CLIP state dict as a transformers CLIPModel state dict."""
    out = {}
    for key, value in rename({k.removeprefix("module."): v for k, v in state.items()}, OPEN_CLIP_RENAMES).items():
        for old, new in OPEN_CLIP_LAYER_RENAMES:
            key = key.replace(old, new)
        if key.endswith("_projection.weight"):
            value = value.t()  # open_clip multiplies x @ proj; nn.Linear stores proj.T
        if ".attn.in_proj_" in key:  # one packed (3D, D) projection -> q, k, v
            prefix, kind = key.split(".attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part
        else:
            out[key] = value
    return out


def vit_h14_config():
    """OpenCLIP ViT-H-14 (laion2B-s32B-b79K, the base of HPSv2 and PickScore) as a transformers CLIPConfig."""
    transformers = need("transformers", "transformers")
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
        projection_dim=1024,
    )  # fmt: skip


def clip_similarity(model, tokenizer, scale):
    """fn(images, prompts) -> scale * cos(image embedding, prompt embedding), for a transformers CLIPModel."""

    def embed(images):
        pixels = clip_preprocess(images, model.config.vision_config.image_size)
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

    def fn(images, prompts):
        ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        text = model.text_projection(model.text_model(input_ids=ids.to(images.device)).pooler_output)
        return scale * F.cosine_similarity(embed(images), text, dim=-1)

    fn.embed = embed
    return fn


def hpsv2(device="cpu", checkpoint=None, tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", config=None):
    """HPS v2.0 score: cosine similarity of the HPSv2 image and prompt embeddings.

    checkpoint: `HPS_v2_compressed.pt` (default `$DAG_HPSV2`, else xswu/HPSv2 on the hub); pass
    `HPS_v2.1_compressed.pt` for v2.1. The tokenizer is OpenCLIP's, i.e. CLIP's BPE with 77 tokens."""
    transformers = need("transformers", "transformers")
    checkpoint = checkpoint or hub_file("xswu/HPSv2", "HPS_v2_compressed.pt", "the HPSv2 checkpoint", "DAG_HPSV2")
    model = transformers.CLIPModel(config or vit_h14_config())
    load_weights(model, checkpoint, "an HPSv2 checkpoint",
                 lambda state: open_clip_to_transformers(state.get("state_dict", state)))
    return clip_similarity(frozen(model, device), transformers.CLIPTokenizer.from_pretrained(tokenizer), scale=1.0)


# --------------------------------------------------------------------------------------------------------------------
# PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic; score = logit_scale * cos
# --------------------------------------------------------------------------------------------------------------------


def pickscore(device="cpu", model="yuvalkirstain/PickScore_v1", tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """PickScore: exp(logit_scale) * cos(image, prompt) of the PickScore_v1 CLIP. Not in the paper."""
    transformers = need("transformers", "transformers")
    clip = frozen(transformers.CLIPModel.from_pretrained(model), device)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer)
    return clip_similarity(clip, tokenizer, scale=clip.logit_scale.exp().item())


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

REWARDS = {
    "aesthetic": aesthetic,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "imagereward": imagereward,
    "hpsv2": hpsv2,
    "pickscore": pickscore,
}
DIFFERENTIABLE = {"aesthetic", "imagereward", "hpsv2", "pickscore"}  # usable by reward backpropagation


class RewardError(ValueError):
    """A reward output that training must not use; dag.py ends the run with its message (exit status 2)."""


def checked(reward_fn, name):
    """The reward with every output checked where it enters: a finite float tensor of shape (B,) on the images'
    device, else RewardError naming the reward, what it returned and the fix (a NaN would otherwise reach weights)."""

    def fn(images, prompts):
        s, B = reward_fn(images, prompts), len(images)
        here = torch.is_tensor(s) and s.device == images.device
        if here and s.shape == (B,) and s.is_floating_point() and bool(torch.isfinite(s).all()):
            return s
        got = type(s).__name__ if not torch.is_tensor(s) else f"{s.dtype} tensor of shape {tuple(s.shape)} on " \
            f"{s.device}" + (f" with {int((~torch.isfinite(s)).sum())} non-finite score(s)" if here else "")
        raise RewardError(f"reward {name!r} returned a {got} for {B} images: return one finite float score per image, "
                          f"a tensor of shape ({B},) on the images' device")

    fn.embed = getattr(reward_fn, "embed", None)
    return fn


def load(name, device="cpu"):
    """A reward fn, its outputs checked (`checked`), from a registry name or from `module:function` (a factory taking
    `device=`)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import the factory {name!r} ({e})") from e
        shape = "a factory f(device=...) returning fn(images, prompts) -> (B,) scores"
        if not callable(factory):
            raise ValueError(f"{name!r} is a {type(factory).__name__}, not {shape}")
        try:
            fn = factory(device=device)
        except TypeError as e:
            raise ValueError(f"{name!r} is not {shape}: calling it with device= raised TypeError ({e})") from e
        if not callable(fn):
            raise ValueError(f"{name!r}(device=...) returned a {type(fn).__name__}, not fn(images, prompts)")
        return checked(fn, name)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: choose from {', '.join(REWARDS)} or give module:function")
    return checked(REWARDS[name](device=device), name)


# --------------------------------------------------------------------------------------------------------------------
# Prompt sets: name -> (train, eval)
# --------------------------------------------------------------------------------------------------------------------

SIMPLE_ANIMALS = """cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf
lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig
turkey fly llama camel bat gorilla hedgehog kangaroo""".split()  # DDPO's 45 simple animals
DRAWBENCH_URL = ("https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY/gviz/tq"
                 "?tqx=out:csv&sheet=Sheet1")
HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


def cache_dir():
    return Path(os.environ.get("DAG_CACHE", Path.home() / ".cache" / "dag"))


def every(prompts, k):
    """(prompts, every k-th prompt): a fixed eval list drawn from the training prompts, which stay trained on (the
    paper holds none out for these sets; their rewards ignore the prompt)."""
    return prompts, prompts[::k]


def imagenet_classes():
    """The 1000 ImageNet-1k class names in class order (e.g. 'tench, Tinca tinca'): the lines of the DAG release's
    alignment/assets/imagenet_classes.txt (DDPO's file), shipped below so the compressibility tasks run offline."""
    return IMAGENET_CLASSES.replace("\n", "").split("|")


def drawbench():
    """DrawBench (Saharia et al. 2022) as the DAG release uses it: 'Misspellings' and 'Rare Words' dropped, the first
    2 prompts of each remaining category held out for evaluation (183 -> 165 train + 18 eval)."""
    path = cache_dir() / "drawbench.csv"
    if not path.is_file():
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise OSError(f"DrawBench is not cached at {path} and HF_HUB_OFFLINE=1; save {DRAWBENCH_URL} there")
        try:
            data = urllib.request.urlopen(DRAWBENCH_URL, timeout=60).read()
        except OSError as e:
            raise OSError(f"cannot download DrawBench ({e}); save {DRAWBENCH_URL} as {path}") from e
        parse_drawbench(data.decode("utf-8", errors="replace"), DRAWBENCH_URL)  # never cache a sign-in page
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # every torchrun rank may download: rename atomically
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return parse_drawbench(path.read_text(encoding="utf-8"), path)


def parse_drawbench(text, source):
    categories = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("Prompts") and row.get("Category"):
            categories.setdefault(row["Category"].strip(), []).append(row["Prompts"].strip())
    kept = [v for k, v in categories.items() if k not in ("Misspellings", "Rare Words")]
    train, held = [p for v in kept for p in v[2:]], [p for v in kept for p in v[:2]]
    if not train or not held:
        raise ValueError(f"{source} is not the DrawBench sheet (no 'Prompts' / 'Category' rows); delete it and retry")
    return train, held


def hpd(*styles):
    """HPDv2 benchmark prompts (800 per style), the first 10 of each style held out for evaluation (the release)."""
    train, heldout = [], []
    for style in styles:
        path = hub_file("zhwang/HPDv2", f"benchmark/{style}.json", f"the HPDv2 {style} prompts", repo_type="dataset")
        prompts = json.loads(Path(path).read_text())
        train, heldout = train + prompts[10:], heldout + prompts[:10]
    return train, heldout


PROMPT_SETS = {
    "simple_animals": lambda: every(SIMPLE_ANIMALS, 6),
    "imagenet_all": lambda: every(imagenet_classes(), 125),
    "drawbench": drawbench,
    "hpd_photo": lambda: hpd("photo"),
    "hpd_photo_painting": lambda: hpd("photo", "paintings"),
    "hpd": lambda: hpd(*HPD_STYLES),
}
TASK_PROMPTS = {  # the paper's prompt set of each task; plug-in rewards default to simple_animals
    "aesthetic": "simple_animals",
    "jpeg_compressibility": "imagenet_all",
    "jpeg_incompressibility": "imagenet_all",
    "imagereward": "drawbench",
    "hpsv2": "hpd_photo_painting",
    "pickscore": "hpd_photo_painting",
}


def task_prompts(reward, prompts=None, eval_prompts=None):
    """A run's (train, eval) prompts: `prompts` (a set or a file), else the reward's task set (plug-ins:
    simple_animals); for evaluation that set's eval split, or `eval_prompts` (a set: its eval split; a file: every
    line). Raises as prompt_set does."""
    train, held = prompt_set(prompts or TASK_PROMPTS.get(reward, "simple_animals"))
    if eval_prompts:
        every_line, split = prompt_set(eval_prompts)
        held = split if eval_prompts in PROMPT_SETS else every_line
    return train, held


def prompt_set(spec):
    """(train, eval) prompts of a named set, or of a text file with one prompt per line (eval: at most 16 of its
    prompts, evenly spaced, still trained on).

    Raises ValueError (unknown name, unreadable or empty file) or OSError (a set that cannot be fetched)."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    try:
        prompts = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a readable file "
                         f"({e.__class__.__name__})") from e
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompt")
    return every(prompts, math.ceil(len(prompts) / 16))


# The 1000 class names, "|"-separated, wrapped at separators (one name longer than a line wraps after a comma)
IMAGENET_CLASSES = """\
tench, Tinca tinca|goldfish, Carassius auratus|
great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias|tiger shark, Galeocerdo cuvieri|
hammerhead, hammerhead shark|electric ray, crampfish, numbfish, torpedo|stingray|cock|hen|ostrich, Struthio camelus|
brambling, Fringilla montifringilla|goldfinch, Carduelis carduelis|house finch, linnet, Carpodacus mexicanus|
junco, snowbird|indigo bunting, indigo finch, indigo bird, Passerina cyanea|
robin, American robin, Turdus migratorius|bulbul|jay|magpie|chickadee|water ouzel, dipper|kite|
bald eagle, American eagle, Haliaeetus leucocephalus|vulture|great grey owl, great gray owl, Strix nebulosa|
European fire salamander, Salamandra salamandra|common newt, Triturus vulgaris|eft|
spotted salamander, Ambystoma maculatum|axolotl, mud puppy, Ambystoma mexicanum|bullfrog, Rana catesbeiana|
tree frog, tree-frog|tailed frog, bell toad, ribbed toad, tailed toad, Ascaphus trui|
loggerhead, loggerhead turtle, Caretta caretta|
leatherback turtle, leatherback, leathery turtle, Dermochelys coriacea|mud turtle|terrapin|box turtle, box tortoise|
banded gecko|common iguana, iguana, Iguana iguana|American chameleon, anole, Anolis carolinensis|
whiptail, whiptail lizard|agama|frilled lizard, Chlamydosaurus kingi|alligator lizard|
Gila monster, Heloderma suspectum|green lizard, Lacerta viridis|African chameleon, Chamaeleo chamaeleon|
Komodo dragon, Komodo lizard, dragon lizard, giant lizard, Varanus komodoensis|
African crocodile, Nile crocodile, Crocodylus niloticus|American alligator, Alligator mississipiensis|triceratops|
thunder snake, worm snake, Carphophis amoenus|ringneck snake, ring-necked snake, ring snake|
hognose snake, puff adder, sand viper|green snake, grass snake|king snake, kingsnake|garter snake, grass snake|
water snake|vine snake|night snake, Hypsiglena torquata|boa constrictor, Constrictor constrictor|
rock python, rock snake, Python sebae|Indian cobra, Naja naja|green mamba|sea snake|
horned viper, cerastes, sand viper, horned asp, Cerastes cornutus|
diamondback, diamondback rattlesnake, Crotalus adamanteus|sidewinder, horned rattlesnake, Crotalus cerastes|
trilobite|harvestman, daddy longlegs, Phalangium opilio|scorpion|black and gold garden spider, Argiope aurantia|
barn spider, Araneus cavaticus|garden spider, Aranea diademata|black widow, Latrodectus mactans|tarantula|
wolf spider, hunting spider|tick|centipede|black grouse|ptarmigan|ruffed grouse, partridge, Bonasa umbellus|
prairie chicken, prairie grouse, prairie fowl|peacock|quail|partridge|
African grey, African gray, Psittacus erithacus|macaw|sulphur-crested cockatoo, Kakatoe galerita, Cacatua galerita|
lorikeet|coucal|bee eater|hornbill|hummingbird|jacamar|toucan|drake|red-breasted merganser, Mergus serrator|goose|
black swan, Cygnus atratus|tusker|echidna, spiny anteater, anteater|
platypus, duckbill, duckbilled platypus, duck-billed platypus, Ornithorhynchus anatinus|wallaby, brush kangaroo|
koala, koala bear, kangaroo bear, native bear, Phascolarctos cinereus|wombat|jellyfish|sea anemone, anemone|
brain coral|flatworm, platyhelminth|nematode, nematode worm, roundworm|conch|snail|slug|sea slug, nudibranch|
chiton, coat-of-mail shell, sea cradle, polyplacophore|chambered nautilus, pearly nautilus, nautilus|
Dungeness crab, Cancer magister|rock crab, Cancer irroratus|fiddler crab|
king crab, Alaska crab, Alaskan king crab, Alaska king crab, Paralithodes camtschatica|
American lobster, Northern lobster, Maine lobster, Homarus americanus|
spiny lobster, langouste, rock lobster, crawfish, crayfish, sea crawfish|crayfish, crawfish, crawdad, crawdaddy|
hermit crab|isopod|white stork, Ciconia ciconia|black stork, Ciconia nigra|spoonbill|flamingo|
little blue heron, Egretta caerulea|American egret, great white heron, Egretta albus|bittern|crane|
limpkin, Aramus pictus|European gallinule, Porphyrio porphyrio|
American coot, marsh hen, mud hen, water hen, Fulica americana|bustard|ruddy turnstone, Arenaria interpres|
red-backed sandpiper, dunlin, Erolia alpina|redshank, Tringa totanus|dowitcher|oystercatcher, oyster catcher|
pelican|king penguin, Aptenodytes patagonica|albatross, mollymawk|
grey whale, gray whale, devilfish, Eschrichtius gibbosus, Eschrichtius robustus|
killer whale, killer, orca, grampus, sea wolf, Orcinus orca|dugong, Dugong dugon|sea lion|Chihuahua|
Japanese spaniel|Maltese dog, Maltese terrier, Maltese|Pekinese, Pekingese, Peke|Shih-Tzu|Blenheim spaniel|papillon|
toy terrier|Rhodesian ridgeback|Afghan hound, Afghan|basset, basset hound|beagle|bloodhound, sleuthhound|bluetick|
black-and-tan coonhound|Walker hound, Walker foxhound|English foxhound|redbone|borzoi, Russian wolfhound|
Irish wolfhound|Italian greyhound|whippet|Ibizan hound, Ibizan Podenco|Norwegian elkhound, elkhound|
otterhound, otter hound|Saluki, gazelle hound|Scottish deerhound, deerhound|Weimaraner|
Staffordshire bullterrier, Staffordshire bull terrier|
American Staffordshire terrier, Staffordshire terrier, American pit bull terrier, pit bull terrier|
Bedlington terrier|Border terrier|Kerry blue terrier|Irish terrier|Norfolk terrier|Norwich terrier|
Yorkshire terrier|wire-haired fox terrier|Lakeland terrier|Sealyham terrier, Sealyham|Airedale, Airedale terrier|
cairn, cairn terrier|Australian terrier|Dandie Dinmont, Dandie Dinmont terrier|Boston bull, Boston terrier|
miniature schnauzer|giant schnauzer|standard schnauzer|Scotch terrier, Scottish terrier, Scottie|
Tibetan terrier, chrysanthemum dog|silky terrier, Sydney silky|soft-coated wheaten terrier|
West Highland white terrier|Lhasa, Lhasa apso|flat-coated retriever|curly-coated retriever|golden retriever|
Labrador retriever|Chesapeake Bay retriever|German short-haired pointer|vizsla, Hungarian pointer|English setter|
Irish setter, red setter|Gordon setter|Brittany spaniel|clumber, clumber spaniel|
English springer, English springer spaniel|Welsh springer spaniel|cocker spaniel, English cocker spaniel, cocker|
Sussex spaniel|Irish water spaniel|kuvasz|schipperke|groenendael|malinois|briard|kelpie|komondor|
Old English sheepdog, bobtail|Shetland sheepdog, Shetland sheep dog, Shetland|collie|Border collie|
Bouvier des Flandres, Bouviers des Flandres|Rottweiler|
German shepherd, German shepherd dog, German police dog, alsatian|Doberman, Doberman pinscher|miniature pinscher|
Greater Swiss Mountain dog|Bernese mountain dog|Appenzeller|EntleBucher|boxer|bull mastiff|Tibetan mastiff|
French bulldog|Great Dane|Saint Bernard, St Bernard|Eskimo dog, husky|malamute, malemute, Alaskan malamute|
Siberian husky|dalmatian, coach dog, carriage dog|affenpinscher, monkey pinscher, monkey dog|basenji|pug, pug-dog|
Leonberg|Newfoundland, Newfoundland dog|Great Pyrenees|Samoyed, Samoyede|Pomeranian|chow, chow chow|keeshond|
Brabancon griffon|Pembroke, Pembroke Welsh corgi|Cardigan, Cardigan Welsh corgi|toy poodle|miniature poodle|
standard poodle|Mexican hairless|timber wolf, grey wolf, gray wolf, Canis lupus|
white wolf, Arctic wolf, Canis lupus tundrarum|red wolf, maned wolf, Canis rufus, Canis niger|
coyote, prairie wolf, brush wolf, Canis latrans|dingo, warrigal, warragal, Canis dingo|dhole, Cuon alpinus|
African hunting dog, hyena dog, Cape hunting dog, Lycaon pictus|hyena, hyaena|red fox, Vulpes vulpes|
kit fox, Vulpes macrotis|Arctic fox, white fox, Alopex lagopus|grey fox, gray fox, Urocyon cinereoargenteus|
tabby, tabby cat|tiger cat|Persian cat|Siamese cat, Siamese|Egyptian cat|
cougar, puma, catamount, mountain lion, painter, panther, Felis concolor|lynx, catamount|leopard, Panthera pardus|
snow leopard, ounce, Panthera uncia|jaguar, panther, Panthera onca, Felis onca|lion, king of beasts, Panthera leo|
tiger, Panthera tigris|cheetah, chetah, Acinonyx jubatus|brown bear, bruin, Ursus arctos|
American black bear, black bear, Ursus americanus, Euarctos americanus|
ice bear, polar bear, Ursus Maritimus, Thalarctos maritimus|sloth bear, Melursus ursinus, Ursus ursinus|mongoose|
meerkat, mierkat|tiger beetle|ladybug, ladybeetle, lady beetle, ladybird, ladybird beetle|
ground beetle, carabid beetle|long-horned beetle, longicorn, longicorn beetle|leaf beetle, chrysomelid|dung beetle|
rhinoceros beetle|weevil|fly|bee|ant, emmet, pismire|grasshopper, hopper|cricket|
walking stick, walkingstick, stick insect|cockroach, roach|mantis, mantid|cicada, cicala|leafhopper|
lacewing, lacewing fly|
dragonfly, darning needle, devil's darning needle, sewing needle, snake feeder, snake doctor, mosquito hawk,
 skeeter hawk|damselfly|admiral|ringlet, ringlet butterfly|
monarch, monarch butterfly, milkweed butterfly, Danaus plexippus|cabbage butterfly|
sulphur butterfly, sulfur butterfly|lycaenid, lycaenid butterfly|starfish, sea star|sea urchin|
sea cucumber, holothurian|wood rabbit, cottontail, cottontail rabbit|hare|Angora, Angora rabbit|hamster|
porcupine, hedgehog|fox squirrel, eastern fox squirrel, Sciurus niger|marmot|beaver|guinea pig, Cavia cobaya|sorrel|
zebra|hog, pig, grunter, squealer, Sus scrofa|wild boar, boar, Sus scrofa|warthog|
hippopotamus, hippo, river horse, Hippopotamus amphibius|ox|
water buffalo, water ox, Asiatic buffalo, Bubalus bubalis|bison|ram, tup|
bighorn, bighorn sheep, cimarron, Rocky Mountain bighorn, Rocky Mountain sheep, Ovis canadensis|ibex, Capra ibex|
hartebeest|impala, Aepyceros melampus|gazelle|Arabian camel, dromedary, Camelus dromedarius|llama|weasel|mink|
polecat, fitch, foulmart, foumart, Mustela putorius|black-footed ferret, ferret, Mustela nigripes|otter|
skunk, polecat, wood pussy|badger|armadillo|three-toed sloth, ai, Bradypus tridactylus|
orangutan, orang, orangutang, Pongo pygmaeus|gorilla, Gorilla gorilla|chimpanzee, chimp, Pan troglodytes|
gibbon, Hylobates lar|siamang, Hylobates syndactylus, Symphalangus syndactylus|guenon, guenon monkey|
patas, hussar monkey, Erythrocebus patas|baboon|macaque|langur|colobus, colobus monkey|
proboscis monkey, Nasalis larvatus|marmoset|capuchin, ringtail, Cebus capucinus|howler monkey, howler|
titi, titi monkey|spider monkey, Ateles geoffroyi|squirrel monkey, Saimiri sciureus|
Madagascar cat, ring-tailed lemur, Lemur catta|indri, indris, Indri indri, Indri brevicaudatus|
Indian elephant, Elephas maximus|African elephant, Loxodonta africana|
lesser panda, red panda, panda, bear cat, cat bear, Ailurus fulgens|
giant panda, panda, panda bear, coon bear, Ailuropoda melanoleuca|barracouta, snoek|eel|
coho, cohoe, coho salmon, blue jack, silver salmon, Oncorhynchus kisutch|rock beauty, Holocanthus tricolor|
anemone fish|sturgeon|gar, garfish, garpike, billfish, Lepisosteus osseus|lionfish|
puffer, pufferfish, blowfish, globefish|abacus|abaya|academic gown, academic robe, judge's robe|
accordion, piano accordion, squeeze box|acoustic guitar|aircraft carrier, carrier, flattop, attack aircraft carrier|
airliner|airship, dirigible|altar|ambulance|amphibian, amphibious vehicle|analog clock|apiary, bee house|apron|
ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin|
assault rifle, assault gun|backpack, back pack, knapsack, packsack, rucksack, haversack|bakery, bakeshop, bakehouse|
balance beam, beam|balloon|ballpoint, ballpoint pen, ballpen, Biro|Band Aid|banjo|
bannister, banister, balustrade, balusters, handrail|barbell|barber chair|barbershop|barn|barometer|barrel, cask|
barrow, garden cart, lawn cart, wheelbarrow|baseball|basketball|bassinet|bassoon|bathing cap, swimming cap|
bath towel|bathtub, bathing tub, bath, tub|
beach wagon, station wagon, wagon, estate car, beach waggon, station waggon, waggon|
beacon, lighthouse, beacon light, pharos|beaker|bearskin, busby, shako|beer bottle|beer glass|bell cote, bell cot|
bib|bicycle-built-for-two, tandem bicycle, tandem|bikini, two-piece|binder, ring-binder|
binoculars, field glasses, opera glasses|birdhouse|boathouse|bobsled, bobsleigh, bob|bolo tie, bolo, bola tie, bola|
bonnet, poke bonnet|bookcase|bookshop, bookstore, bookstall|bottlecap|bow|bow tie, bow-tie, bowtie|
brass, memorial tablet, plaque|brassiere, bra, bandeau|breakwater, groin, groyne, mole, bulwark, seawall, jetty|
breastplate, aegis, egis|broom|bucket, pail|buckle|bulletproof vest|bullet train, bullet|butcher shop, meat market|
cab, hack, taxi, taxicab|caldron, cauldron|candle, taper, wax light|cannon|canoe|can opener, tin opener|cardigan|
car mirror|carousel, carrousel, merry-go-round, roundabout, whirligig|carpenter's kit, tool kit|carton|car wheel|
cash machine, cash dispenser, automated teller machine, automatic teller machine, automated teller,
 automatic teller, ATM|cassette|cassette player|castle|catamaran|CD player|cello, violoncello|
cellular telephone, cellular phone, cellphone, cell, mobile phone|chain|chainlink fence|
chain mail, ring mail, mail, chain armor, chain armour, ring armor, ring armour|chain saw, chainsaw|chest|
chiffonier, commode|chime, bell, gong|china cabinet, china closet|Christmas stocking|church, church building|
cinema, movie theater, movie theatre, movie house, picture palace|cleaver, meat cleaver, chopper|cliff dwelling|
cloak|clog, geta, patten, sabot|cocktail shaker|coffee mug|coffeepot|coil, spiral, volute, whorl, helix|
combination lock|computer keyboard, keypad|confectionery, confectionary, candy store|
container ship, containership, container vessel|convertible|corkscrew, bottle screw|cornet, horn, trumpet, trump|
cowboy boot|cowboy hat, ten-gallon hat|cradle|crane|crash helmet|crate|crib, cot|Crock Pot|croquet ball|crutch|
cuirass|dam, dike, dyke|desk|desktop computer|dial telephone, dial phone|diaper, nappy, napkin|digital clock|
digital watch|dining table, board|dishrag, dishcloth|dishwasher, dish washer, dishwashing machine|
disk brake, disc brake|dock, dockage, docking facility|dogsled, dog sled, dog sleigh|dome|doormat, welcome mat|
drilling platform, offshore rig|drum, membranophone, tympan|drumstick|dumbbell|Dutch oven|electric fan, blower|
electric guitar|electric locomotive|entertainment center|envelope|espresso maker|face powder|feather boa, boa|
file, file cabinet, filing cabinet|fireboat|fire engine, fire truck|fire screen, fireguard|flagpole, flagstaff|
flute, transverse flute|folding chair|football helmet|forklift|fountain|fountain pen|four-poster|freight car|
French horn, horn|frying pan, frypan, skillet|fur coat|garbage truck, dustcart|gasmask, respirator, gas helmet|
gas pump, gasoline pump, petrol pump, island dispenser|goblet|go-kart|golf ball|golfcart, golf cart|gondola|
gong, tam-tam|gown|grand piano, grand|greenhouse, nursery, glasshouse|grille, radiator grille|
grocery store, grocery, food market, market|guillotine|hair slide|hair spray|half track|hammer|hamper|
hand blower, blow dryer, blow drier, hair dryer, hair drier|hand-held computer, hand-held microcomputer|
handkerchief, hankie, hanky, hankey|hard disc, hard disk, fixed disk|harmonica, mouth organ, harp, mouth harp|harp|
harvester, reaper|hatchet|holster|home theater, home theatre|honeycomb|hook, claw|hoopskirt, crinoline|
horizontal bar, high bar|horse cart, horse-cart|hourglass|iPod|iron, smoothing iron|jack-o'-lantern|
jean, blue jean, denim|jeep, landrover|jersey, T-shirt, tee shirt|jigsaw puzzle|jinrikisha, ricksha, rickshaw|
joystick|kimono|knee pad|knot|lab coat, laboratory coat|ladle|lampshade, lamp shade|laptop, laptop computer|
lawn mower, mower|lens cap, lens cover|letter opener, paper knife, paperknife|library|lifeboat|
lighter, light, igniter, ignitor|limousine, limo|liner, ocean liner|lipstick, lip rouge|Loafer|lotion|
loudspeaker, speaker, speaker unit, loudspeaker system, speaker system|loupe, jeweler's loupe|lumbermill, sawmill|
magnetic compass|mailbag, postbag|mailbox, letter box|maillot|maillot, tank suit|manhole cover|maraca|
marimba, xylophone|mask|matchstick|maypole|maze, labyrinth|measuring cup|medicine chest, medicine cabinet|
megalith, megalithic structure|microphone, mike|microwave, microwave oven|military uniform|milk can|minibus|
miniskirt, mini|minivan|missile|mitten|mixing bowl|mobile home, manufactured home|Model T|modem|monastery|monitor|
moped|mortar|mortarboard|mosque|mosquito net|motor scooter, scooter|mountain bike, all-terrain bike, off-roader|
mountain tent|mouse, computer mouse|mousetrap|moving van|muzzle|nail|neck brace|necklace|nipple|
notebook, notebook computer|obelisk|oboe, hautboy, hautbois|ocarina, sweet potato|
odometer, hodometer, mileometer, milometer|oil filter|organ, pipe organ|
oscilloscope, scope, cathode-ray oscilloscope, CRO|overskirt|oxcart|oxygen mask|packet|paddle, boat paddle|
paddlewheel, paddle wheel|padlock|paintbrush|pajama, pyjama, pj's, jammies|palace|panpipe, pandean pipe, syrinx|
paper towel|parachute, chute|parallel bars, bars|park bench|parking meter|passenger car, coach, carriage|
patio, terrace|pay-phone, pay-station|pedestal, plinth, footstall|pencil box, pencil case|pencil sharpener|
perfume, essence|Petri dish|photocopier|pick, plectrum, plectron|pickelhaube|picket fence, paling|
pickup, pickup truck|pier|piggy bank, penny bank|pill bottle|pillow|ping-pong ball|pinwheel|pirate, pirate ship|
pitcher, ewer|plane, carpenter's plane, woodworking plane|planetarium|plastic bag|plate rack|plow, plough|
plunger, plumber's helper|Polaroid camera, Polaroid Land camera|pole|
police van, police wagon, paddy wagon, patrol wagon, wagon, black Maria|poncho|
pool table, billiard table, snooker table|pop bottle, soda bottle|pot, flowerpot|potter's wheel|power drill|
prayer rug, prayer mat|printer|prison, prison house|projectile, missile|projector|puck, hockey puck|
punching bag, punch bag, punching ball, punchball|purse|quill, quill pen|quilt, comforter, comfort, puff|
racer, race car, racing car|racket, racquet|radiator|radio, wireless|radio telescope, radio reflector|rain barrel|
recreational vehicle, RV, R.V.|reel|reflex camera|refrigerator, icebox|remote control, remote|
restaurant, eating house, eating place, eatery|revolver, six-gun, six-shooter|rifle|rocking chair, rocker|
rotisserie|rubber eraser, rubber, pencil eraser|rugby ball|rule, ruler|running shoe|safe|safety pin|
saltshaker, salt shaker|sandal|sarong|sax, saxophone|scabbard|scale, weighing machine|school bus|schooner|
scoreboard|screen, CRT screen|screw|screwdriver|seat belt, seatbelt|sewing machine|shield, buckler|
shoe shop, shoe-shop, shoe store|shoji|shopping basket|shopping cart|shovel|shower cap|shower curtain|ski|ski mask|
sleeping bag|slide rule, slipstick|sliding door|slot, one-armed bandit|snorkel|snowmobile|snowplow, snowplough|
soap dispenser|soccer ball|sock|solar dish, solar collector, solar furnace|sombrero|soup bowl|space bar|
space heater|space shuttle|spatula|speedboat|spider web, spider's web|spindle|sports car, sport car|spotlight, spot|
stage|steam locomotive|steel arch bridge|steel drum|stethoscope|stole|stone wall|stopwatch, stop watch|stove|
strainer|streetcar, tram, tramcar, trolley, trolley car|stretcher|studio couch, day bed|stupa, tope|
submarine, pigboat, sub, U-boat|suit, suit of clothes|sundial|sunglass|sunglasses, dark glasses, shades|
sunscreen, sunblock, sun blocker|suspension bridge|swab, swob, mop|sweatshirt|swimming trunks, bathing trunks|swing|
switch, electric switch, electrical switch|syringe|table lamp|
tank, army tank, armored combat vehicle, armoured combat vehicle|tape player|teapot|teddy, teddy bear|
television, television system|tennis ball|thatch, thatched roof|theater curtain, theatre curtain|thimble|
thresher, thrasher, threshing machine|throne|tile roof|toaster|tobacco shop, tobacconist shop, tobacconist|
toilet seat|torch|totem pole|tow truck, tow car, wrecker|toyshop|tractor|
trailer truck, tractor trailer, trucking rig, rig, articulated lorry, semi|tray|trench coat|
tricycle, trike, velocipede|trimaran|tripod|triumphal arch|trolleybus, trolley coach, trackless trolley|trombone|
tub, vat|turnstile|typewriter keyboard|umbrella|unicycle, monocycle|upright, upright piano|vacuum, vacuum cleaner|
vase|vault|velvet|vending machine|vestment|viaduct|violin, fiddle|volleyball|waffle iron|wall clock|
wallet, billfold, notecase, pocketbook|wardrobe, closet, press|warplane, military plane|
washbasin, handbasin, washbowl, lavabo, wash-hand basin|washer, automatic washer, washing machine|water bottle|
water jug|water tower|whiskey jug|whistle|wig|window screen|window shade|Windsor tie|wine bottle|wing|wok|
wooden spoon|wool, woolen, woollen|worm fence, snake fence, snake-rail fence, Virginia fence|wreck|yawl|yurt|
web site, website, internet site, site|comic book|crossword puzzle, crossword|street sign|
traffic light, traffic signal, stoplight|book jacket, dust cover, dust jacket, dust wrapper|menu|plate|guacamole|
consomme|hot pot, hotpot|trifle|ice cream, icecream|ice lolly, lolly, lollipop, popsicle|French loaf|bagel, beigel|
pretzel|cheeseburger|hotdog, hot dog, red hot|mashed potato|head cabbage|broccoli|cauliflower|zucchini, courgette|
spaghetti squash|acorn squash|butternut squash|cucumber, cuke|artichoke, globe artichoke|bell pepper|cardoon|
mushroom|Granny Smith|strawberry|orange|lemon|fig|pineapple, ananas|banana|jackfruit, jak, jack|custard apple|
pomegranate|hay|carbonara|chocolate sauce, chocolate syrup|dough|meat loaf, meatloaf|pizza, pizza pie|potpie|
burrito|red wine|espresso|cup|eggnog|alp|bubble|cliff, drop, drop-off|coral reef|geyser|lakeside, lakeshore|
promontory, headland, head, foreland|sandbar, sand bar|seashore, coast, seacoast, sea-coast|valley, vale|volcano|
ballplayer, baseball player|groom, bridegroom|scuba diver|rapeseed|daisy|
yellow lady's slipper, yellow lady-slipper, Cypripedium calceolus, Cypripedium parviflorum|corn|acorn|
hip, rose hip, rosehip|buckeye, horse chestnut, conker|coral fungus|agaric|gyromitra|stinkhorn, carrion fungus|
earthstar|hen-of-the-woods, hen of the woods, Polyporus frondosus, Grifola frondosa|bolete|ear, spike, capitulum|
toilet tissue, toilet paper, bathroom tissue"""
