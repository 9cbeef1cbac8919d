"""From-scratch encoders for quick experiments and the quickstart.

``scratch-vision`` is a small ViT built by ``timm.create_model`` with random weights.
``scratch-text`` is a small pre-norm transformer whose WordPiece tokenizer is trained on the
run's training captions (``prepare``) and saved in the run directory (``save_assets``).

Both can be exactly CLIP's towers (Radford et al. 2021; the seeds' "CLIP-style architecture",
seed 001 §6.1): ``scratch-text`` with ``attention = "causal"``, ``pooling = "eot"``,
``init = "clip"`` (and ``mlp_ratio = 4``); ``scratch-vision`` with ``ln_pre = true``,
``pooling = "cls"``, ``init = "clip"``, ``norm_eps = 1e-5`` (and ``mlp_ratio = 4``);
``activation = "quick_gelu"`` for OpenAI's models. open_clip's weights of the same shapes
load into them and give the same features (tests/test_clip_towers.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn

from mmfw.spi import PluginError, option

from .attention import EncoderLayer, Packed, check_layer, encoder_forward
from .groups import ordered, timm_groups
from .images import normalise, to_tensor

_pos = attrs.validators.ge(1)

Activation = Literal["gelu", "quick_gelu"]


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


@attrs.frozen
class ScratchVisionOptions:
    image_size: int = option(48, doc="input side in pixels (images are resized to it)",
                             validator=_pos)
    patch_size: int = option(6, doc="ViT patch side in pixels", validator=_pos)
    width: int = option(128, doc="transformer width (= output dim)", validator=_pos)
    depth: int = option(4, doc="transformer blocks", validator=_pos)
    heads: int = option(4, doc="attention heads", validator=_pos)
    mlp_ratio: float = option(2.0, doc="MLP hidden width / width", validator=attrs.validators.gt(0))
    pooling: Literal["cls", "mean"] = option("mean", doc="class token or mean of patch tokens")
    base: str = option("vit_tiny_patch16_224", doc="timm architecture the options override")
    ln_pre: bool = option(False, doc="LayerNorm after the patch and position embeddings, "
                          "before the blocks (CLIP's ln_pre; the patch projection then has "
                          "no bias, as CLIP's)")
    init: Literal["timm", "clip"] = option("timm", doc="weight initialisation: timm's ViT "
                                           "init, or CLIP's (class and position embeddings "
                                           "N(0, width^-0.5), PyTorch's defaults elsewhere)")
    norm_eps: float = option(1e-6, doc="epsilon of every LayerNorm (timm: 1e-6; CLIP: 1e-5)",
                             validator=attrs.validators.gt(0))
    activation: Activation = option("gelu", doc="MLP activation (quick_gelu: OpenAI CLIP's)")
    attention_impl: Literal["mmfw", "sdpa"] = option(
        "mmfw", doc="attention on the CPU in fp32 under the math kernel: mmfw's packed-QKV "
        "kernel (SDPA's math operations, fewer layout copies; 1.2-1.4x faster attention at "
        "the quickstart's shapes) or always F.scaled_dot_product_attention (sdpa); same "
        "parameters and results either way")
    grad_checkpointing: bool = option(False, doc="recompute each block's activations in the "
                                      "backward pass instead of storing them (timm's "
                                      "set_grad_checkpointing, non-reentrant): less memory, "
                                      "about one more forward of compute; same gradients")

    def __attrs_post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"'image_size' ({self.image_size}) must be a multiple of "
                             f"'patch_size' ({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"'width' ({self.width}) must be divisible by 'heads' ({self.heads})")


class ScratchVision(nn.Module):
    Options = ScratchVisionOptions
    modality = "image"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, options: ScratchVisionOptions | None = None) -> None:
        import timm  # here, not at import: loading the plugin registry stays light
        from timm.models.vision_transformer import Attention

        super().__init__()
        o = self.options = options or ScratchVisionOptions()
        extra: dict[str, object] = {}
        if o.ln_pre:
            extra["pre_norm"] = True
        if o.norm_eps != 1e-6:
            extra["norm_layer"] = partial(timm.layers.LayerNorm, eps=o.norm_eps)
        if o.activation != "gelu":
            extra["act_layer"] = o.activation
        self.model = timm.create_model(
            o.base, pretrained=False, num_classes=0, img_size=o.image_size,
            patch_size=o.patch_size, embed_dim=o.width, depth=o.depth, num_heads=o.heads,
            mlp_ratio=o.mlp_ratio, global_pool="token" if o.pooling == "cls" else "avg",
            **extra,
        )
        if o.attention_impl == "mmfw":
            from .vit_attention import PackedQKVAttention

            # the class of each block's attention, swapped after create_model: the subclass
            # adds no state, and timm's recorded arguments (its config.json for exports to
            # timm / open_clip) stay those of the plain model
            for block in self.model.blocks:
                if type(block.attn) is Attention:
                    block.attn.__class__ = PackedQKVAttention
        if o.init == "clip":
            clip_vision_init(self.model)
        if o.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.dim = int(self.model.num_features)

    def preprocess(self, image: Image.Image | Tensor) -> Tensor:
        return self.normalize(self.preprocess_uint8(image))

    def preprocess_uint8(self, image: Image.Image | Tensor) -> Tensor:
        return to_tensor(image, self.options.image_size)

    def normalize(self, pixels: Tensor) -> Tensor:
        return normalise(pixels, self.mean, self.std)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixels)

    def forward_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised ViT tokens (class token first) ``[B, L, dim]`` and an all-true mask."""
        x = self.model.forward_features(pixels)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def pool_tokens(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``forward`` from ``forward_tokens``'s output: one pass gives both."""
        return self.model.forward_head(tokens)

    def named_groups(self) -> dict[str, list[str]]:
        return timm_groups(self.model, prefix="model.")


@torch.no_grad()
def clip_vision_init(vit: nn.Module) -> None:
    """OpenAI CLIP's initialisation of its ViT (open_clip's ``VisionTransformer``): class and
    position embeddings ``N(0, width^-0.5)``; the blocks as ``nn.MultiheadAttention`` and
    ``nn.Linear`` initialise themselves (in-projection Xavier-uniform with zero bias, out
    projection PyTorch's default with zero bias, MLP PyTorch's default); the patch
    projection PyTorch's default; LayerNorms ones and zeros."""
    width = vit.embed_dim
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=width**-0.5)
    if getattr(vit, "pos_embed", None) is not None:
        nn.init.normal_(vit.pos_embed, std=width**-0.5)
    vit.patch_embed.proj.reset_parameters()
    for blk in vit.blocks:
        nn.init.xavier_uniform_(blk.attn.qkv.weight)
        if blk.attn.qkv.bias is not None:
            nn.init.zeros_(blk.attn.qkv.bias)
        blk.attn.proj.reset_parameters()
        if blk.attn.proj.bias is not None:
            nn.init.zeros_(blk.attn.proj.bias)
        blk.mlp.fc1.reset_parameters()
        blk.mlp.fc2.reset_parameters()
    for m in vit.modules():
        if isinstance(m, nn.LayerNorm):
            m.reset_parameters()


SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _causal(length: int, device: torch.device) -> Tensor:
    """Bool ``[L, L]``: query ``i`` may attend to key ``j <= i``."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


@attrs.frozen
class ScratchTextOptions:
    vocab_size: int = option(2000, doc="tokenizer vocabulary (trained on the train captions)",
                             validator=attrs.validators.ge(len(SPECIALS) + 1))
    max_length: int = option(48, doc="tokens per caption after truncation", validator=_pos)
    width: int = option(128, doc="transformer width (= output dim)", validator=_pos)
    depth: int = option(3, doc="transformer layers", validator=_pos)
    heads: int = option(4, doc="attention heads", validator=_pos)
    mlp_ratio: float = option(2.0, doc="MLP hidden width / width", validator=attrs.validators.gt(0))
    dropout: float = option(0.0, doc="dropout in the transformer layers",
                            validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    pooling: Literal["mean", "cls", "eot"] = option(
        "mean", doc="mean of tokens, the [CLS] token, or the last token ([SEP]: CLIP's "
        "end-of-text pooling)")
    unpad: bool = option(True, doc="norms, projections and MLP on the real tokens only "
                         "(exact; padding costs nothing but in attention)")
    attention: Literal["bidirectional", "causal"] = option(
        "bidirectional", doc="every token attends to every token, or only to those before it "
        "(CLIP's text transformer)")
    init: Literal["default", "clip"] = option(
        "default", doc="weight initialisation: PyTorch's layers' own (embeddings N(0, 0.02)), "
        "or CLIP's (token N(0, 0.02), position N(0, 0.01), attention and MLP weights scaled "
        "by width and depth)")
    activation: Activation = option("gelu", doc="MLP activation (quick_gelu: OpenAI CLIP's)")
    attention_impl: Literal["mmfw", "sdpa"] = option(
        "mmfw", doc="attention on the CPU in fp32 under the math kernel: mmfw's packed-QKV "
        "kernel (SDPA's math operations, fewer layout copies; 1.2-1.4x faster attention at "
        "the quickstart's shapes) or always F.scaled_dot_product_attention (sdpa); same "
        "parameters and results either way")
    grad_checkpointing: bool = option(False, doc="recompute each layer's activations in the "
                                      "backward pass instead of storing them "
                                      "(torch.utils.checkpoint, non-reentrant): less memory, "
                                      "about one more forward of compute; same gradients")

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"'width' ({self.width}) must be divisible by 'heads' ({self.heads})")
        if self.attention == "causal" and self.pooling == "cls":
            raise ValueError("'pooling' = \"cls\" with causal attention sees the first token "
                             "only: use \"eot\" (CLIP) or \"mean\"")


def train_wordpiece(texts: Iterable[str], vocab_size: int, max_length: int) -> Tokenizer:
    """A WordPiece tokenizer whose vocabulary is the specials, every character (alone and as a
    ``##`` continuation), then whole words by frequency (ties alphabetical).

    Built here rather than with ``tokenizers``' WordPieceTrainer, whose vocabulary differs from
    run to run for the same input (huggingface/tokenizers#1794): a run must be reproducible.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = dict.fromkeys([*SPECIALS, *chars, *(f"##{c}" for c in chars)])
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    _configure(tok, max_length)
    return tok


def _configure(tok: Tokenizer, max_length: int) -> None:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")


class ScratchText(nn.Module):
    Options = ScratchTextOptions
    modality = "text"
    TOKENIZER_FILE = "tokenizer.json"

    def __init__(self, options: ScratchTextOptions | None = None) -> None:
        super().__init__()
        o = self.options = options or ScratchTextOptions()
        self.tokenizer: Tokenizer | None = None
        self.embed = nn.Embedding(o.vocab_size, o.width)
        self.pos = nn.Parameter(torch.randn(o.max_length, o.width) * 0.02)
        layer = EncoderLayer(
            o.width, o.heads, int(o.width * o.mlp_ratio), dropout=o.dropout,
            activation="gelu" if o.activation == "gelu" else quick_gelu, batch_first=True,
            norm_first=True,
        )
        # parameters of nn.TransformerEncoder (checkpoint keys), run by attention.encoder_forward
        self.layers = nn.TransformerEncoder(layer, o.depth, enable_nested_tensor=False)
        for each in self.layers.layers:
            check_layer(each)
            each.attention_impl = o.attention_impl
        self.norm = nn.LayerNorm(o.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        if o.init == "clip":
            self._clip_init()
        self.dim = o.width

    @torch.no_grad()
    def _clip_init(self) -> None:
        """CLIP's text initialisation (open_clip ``TextTransformer.init_parameters``)."""
        o = self.options
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        attn_std, fc_std = o.width**-0.5, (2 * o.width) ** -0.5
        proj_std = o.width**-0.5 * (2 * o.depth) ** -0.5
        for layer in self.layers.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(layer.linear1.weight, std=fc_std)
            nn.init.normal_(layer.linear2.weight, std=proj_std)

    # tokenizer lifecycle ------------------------------------------------------------------
    def prepare(self, train_texts: Iterable[str]) -> None:
        """Train the WordPiece tokenizer on the training captions (before training)."""
        o = self.options
        self.tokenizer = train_wordpiece(train_texts, o.vocab_size, o.max_length)

    def save_assets(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._require_tokenizer().save(str(Path(directory) / self.TOKENIZER_FILE))

    def load_assets(self, directory: str | Path) -> None:
        path = Path(directory) / self.TOKENIZER_FILE
        if not path.is_file():  # tokenizers' own error names no file
            raise PluginError(f"scratch-text: the tokenizer file {path} is missing (it is "
                              "written into the run directory with the first checkpoint)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a damaged file
            raise PluginError(f"scratch-text: {path} is not a readable tokenizer ({err})"
                              ) from None
        _configure(tok, self.options.max_length)
        self.tokenizer = tok

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError(
                "scratch-text has no tokenizer yet: call prepare(train_texts) to train one, "
                "or load_assets(run_dir/'assets/text') to load a run's"
            )
        return self.tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self._require_tokenizer().encode_batch([str(t) for t in texts])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
        return {"input_ids": ids, "attention_mask": mask}

    # model ----------------------------------------------------------------------------------
    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        return self.pool_tokens(*self.forward_tokens(tokens))

    def forward_tokens(self, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Normalised token features ``[B, L, width]`` and the attention mask ``[B, L]``."""
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        causal = self.options.attention == "causal"
        if self.options.unpad:  # embed and run only the real tokens (one host sync: nonzero)
            packed = Packed.of(mask)
            if causal:  # keys: real and not after the query ([B, 1, L, L])
                packed = packed._replace(keep=packed.keep & _causal(ids.shape[1], ids.device))
            # F.embedding, not pos[...]: advanced indexing's backward accumulates in a
            # thread-dependent order on CPU, and a run must be reproducible
            x = self.embed(packed.pack(ids)) + F.embedding(packed.rows % packed.length,
                                                           self.pos)
            x = encoder_forward(self.layers, x, packed, checkpoint=self._checkpointing())
            return packed.unpack(self.norm(x)), mask
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        keep = mask[:, None, None, :]
        if causal:
            keep = keep & _causal(ids.shape[1], ids.device)
        x = encoder_forward(self.layers, x, keep, checkpoint=self._checkpointing())
        return self.norm(x), mask

    def _checkpointing(self) -> bool:
        """Checkpoint the layers only where a backward pass will follow (training, with
        autograd on): under ``no_grad`` there is nothing to save memory on."""
        return self.options.grad_checkpointing and self.training and torch.is_grad_enabled()

    def pool_tokens(self, x: Tensor, mask: Tensor) -> Tensor:
        """The pooled ``[B, width]`` embedding of ``forward_tokens``'s output."""
        if self.options.pooling == "cls":
            return x[:, 0]
        if self.options.pooling == "eot":  # the last real token: [SEP], CLIP's end of text
            last = mask.long().sum(1).sub(1).clamp_min(0)
            return x[torch.arange(x.shape[0], device=x.device), last]
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)

    def named_groups(self) -> dict[str, list[str]]:
        layers: dict[int, list[str]] = defaultdict(list)
        for name, _ in self.layers.named_parameters(prefix="layers"):
            layers[int(name.split(".")[2])].append(name)  # layers.layers.<i>.<...>
        return ordered(["embed.weight", "pos"], layers,
                       [n for n, _ in self.norm.named_parameters(prefix="norm")])
