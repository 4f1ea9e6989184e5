"""Reward functions and prompt sets for dag.py: the paper's four tasks, plus PickScore.

Every entry of `REWARDS` is a factory `make(device) -> fn` whose closure has the signature

    fn(images: (B, 3, H, W) float in [0, 1], prompts: list[str]) -> (B,) float32 tensor on images.device

and returns the *raw* score r(x0). A model reward also sets `fn.embed(images) -> (B, d)`, its image embedding, which
dag.py uses to measure the diversity of evaluation samples. The temperature `reward_exp` is applied in dag.py only. Heavy imports and weight
loading happen inside the factories, so `import rewards` is instant and never fails for a missing optional package.
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
        raise OSError(f"cannot fetch {what} ({repo}/{filename}: {e.__class__.__name__}); download it once online{hint}") from e


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
    head_path = head_path or hub_file(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE, "the LAION aesthetic head", "DAG_AESTHETIC_HEAD")
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
    checkpoint = checkpoint or hub_file("THUDM/ImageReward", "ImageReward.pt", "the ImageReward checkpoint", "DAG_IMAGEREWARD")
    vision_config, text_config = configs or imagereward_configs()
    model = nn.ModuleDict({
        "vision": transformers.BlipVisionModel(vision_config),
        "text": transformers.BlipTextModel(text_config, add_pooling_layer=False),
        "head": MLPHead(text_config.hidden_size),
    })  # fmt: skip
    model = frozen(load_weights(model, checkpoint, "an ImageReward checkpoint", lambda state: rename(state, IMAGEREWARD_RENAMES)), device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)

    def vision(images):
        return model["vision"](pixel_values=clip_preprocess(images, vision_config.image_size))

    def fn(images, prompts):
        tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").to(images.device)
        image_tokens = vision(images).last_hidden_state
        text = model["text"](input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_tokens,
                             encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device))  # fmt: skip
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
        ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
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
    load_weights(model, checkpoint, "an HPSv2 checkpoint", lambda state: open_clip_to_transformers(state.get("state_dict", state)))
    return clip_similarity(frozen(model, device), transformers.CLIPTokenizer.from_pretrained(tokenizer), scale=1.0)


# --------------------------------------------------------------------------------------------------------------------
# PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic; score = logit_scale * cos
# --------------------------------------------------------------------------------------------------------------------


def pickscore(device="cpu", model="yuvalkirstain/PickScore_v1", tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """PickScore: exp(logit_scale) * cos(image, prompt) of the PickScore_v1 CLIP. Not in the paper."""
    transformers = need("transformers", "transformers")
    clip = frozen(transformers.CLIPModel.from_pretrained(model), device)
    return clip_similarity(clip, transformers.CLIPTokenizer.from_pretrained(tokenizer), scale=clip.logit_scale.exp().item())


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


def load(name, device="cpu"):
    """A reward fn from a registry name or from `module:function` (a factory taking `device=`)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import the factory {name!r} ({e})") from e
        return factory(device=device)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: choose from {', '.join(REWARDS)} or give module:function")
    return REWARDS[name](device=device)


# --------------------------------------------------------------------------------------------------------------------
# Prompt sets: name -> (train, eval)
# --------------------------------------------------------------------------------------------------------------------

SIMPLE_ANIMALS = """cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf
lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig
turkey fly llama camel bat gorilla hedgehog kangaroo""".split()  # DDPO's 45 simple animals
DRAWBENCH_URL = "https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY/gviz/tq?tqx=out:csv&sheet=Sheet1"
HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


def cache_dir():
    return Path(os.environ.get("DAG_CACHE", Path.home() / ".cache" / "dag"))


def every(prompts, k):
    """(prompts, every k-th prompt): a fixed eval list drawn from the training prompts, which stay trained on (the
    paper holds none out for these sets; their rewards ignore the prompt)."""
    return prompts, prompts[::k]


def imagenet_classes():
    """The 1000 ImageNet-1k class names (e.g. 'tench, Tinca tinca'), as in DDPO's imagenet_classes.txt."""
    path = hub_file("google/vit-base-patch16-224", "config.json", "the ImageNet class names")
    labels = json.loads(Path(path).read_text())["id2label"]
    return [labels[str(i)] for i in range(1000)]


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
    """HPDv2 benchmark prompts (800 per style), the first 10 of each style held out for evaluation, as in the release."""
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


def prompt_set(spec):
    """(train, eval) prompts of a named set, or of a text file with one prompt per line (eval: at most 16 of its
    prompts, evenly spaced, still trained on).

    Raises ValueError (unknown name, unreadable or empty file) or OSError (a set that cannot be fetched)."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    try:
        prompts = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a readable file ({e.__class__.__name__})") from e
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompt")
    return every(prompts, math.ceil(len(prompts) / 16))
