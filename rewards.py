"""Reward functions for dag.py.

Every entry of `REWARDS` is a factory `make(device) -> fn` whose closure has the signature

    fn(images: (B, 3, H, W) float in [0, 1], prompts: list[str]) -> (B,) float tensor on images.device

and returns the *raw* score r(x0). The temperature `reward_exp` is applied in dag.py only. Heavy imports and weight
loading happen inside the factories, so `import rewards` is instant and never fails for a missing optional package.
A reward of your own needs no edit here: `--reward mypkg.module:function` imports a factory of the same shape.
"""

import importlib
import io
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


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


# ---------------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor: CLIP ViT-L/14 image embedding -> MLP head (christophschuhmann/improved-aesthetic-predictor)
# ---------------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"  # a public hub mirror of the LAION file


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


class AestheticHead(nn.Module):
    """The LAION MLP, laid out so its state dict loads as is (indices 1, 3, 5 held dropout, a no-op at inference)."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
            nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embedding):  # (B, dim) L2-normalised -> (B,)
        return self.layers(embedding).squeeze(-1)


def aesthetic(device="cpu", clip_model="openai/clip-vit-large-patch14", head_path=None):
    """LAION aesthetic score (about 1-10) of the image, computed in fp32; differentiable when grad is enabled.

    head_path: a local copy of `sac+logos+ava1-l14-linearMSE.pth`; default `$DAG_AESTHETIC_HEAD`, else the hub."""
    from transformers import CLIPVisionModelWithProjection

    head_path = head_path or os.environ.get("DAG_AESTHETIC_HEAD")
    if head_path is None:
        from huggingface_hub import hf_hub_download

        head_path = hf_hub_download(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE)
    clip = CLIPVisionModelWithProjection.from_pretrained(clip_model, torch_dtype=torch.float32)
    clip = clip.to(device).eval().requires_grad_(False)
    head = AestheticHead(clip.config.projection_dim)
    head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    head = head.to(device).eval().requires_grad_(False)

    def fn(images, prompts):
        embedding = clip(pixel_values=clip_preprocess(images, clip.config.image_size)).image_embeds
        return head(embedding / embedding.norm(dim=-1, keepdim=True))

    return fn


REWARDS = {
    "aesthetic": aesthetic,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


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
