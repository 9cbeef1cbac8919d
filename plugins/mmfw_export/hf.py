"""``hf``: a ``transformers.VisionTextDualEncoderModel`` folder (weights, config, the image
processor and the tokenizer), loadable with transformers alone:
``VisionTextDualEncoderModel.from_pretrained(folder)`` and
``VisionTextDualEncoderProcessor.from_pretrained(folder)``.

That class embeds an image as ``visual_projection(vision_model(x).pooler_output)`` and a
caption as ``text_projection(text_model(x).pooler_output)``, both projections
``nn.Linear(bias=False)``, and keeps CLIP's ``logit_scale = log(1/tau)``
(transformers' ``modeling_vision_text_dual_encoder.py``). So a run maps exactly when:

- both towers are transformers models (``hf-vision`` + ``hf-text``);
- the adapter is ``linear`` without bias (its weight is the projection) or ``identity`` (an
  identity matrix);
- each tower's pooling is the model's own ``pooler`` output, or, for a ViT/DeiT image tower,
  ``cls``: their pooler is ``dense`` + ``pooler_act`` over the first token, so an identity
  ``dense`` with ``pooler_act = "linear"`` gives the class token itself. BERT-style text
  poolers apply a fixed tanh, so text ``cls``/``mean`` and image ``mean`` have no exact form.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import mmfw

from .towers import MappedExporter, logit_scale, option, projection

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: image models whose pooler is ``pooler_act(dense(hidden[:, 0]))`` with a configurable
#: activation (transformers' ViTPooler / DeiTPooler)
CLS_POOLERS = ("vit", "deit")


def mismatch(run: mmfw.LoadedRun) -> tuple[str, str] | None:
    """``(part, why)`` of the first part of the run this format cannot hold, else None."""
    m, rm = run.model, run.recipe.model
    if m.fusion is not None:
        return (f"the [model.fusion] head '{rm.fusion.name}'",
                "VisionTextDualEncoderModel has no image-text matching head")
    for side, encoder in (("vision", rm.vision.name), ("text", rm.text.name)):
        if encoder != f"hf-{side}":
            return (f"the {side} tower '{encoder}'",
                    f"VisionTextDualEncoderModel holds a transformers {side} model, which "
                    "only hf-vision and hf-text are")
    from transformers import PreTrainedModel  # loaded already: both towers are transformers'

    for side, tower, encoder in (("vision", m.vision, rm.vision.name),
                                 ("text", m.text, rm.text.name)):
        if not isinstance(getattr(tower, "model", None), PreTrainedModel):
            return (f"the {side} tower '{encoder}'",
                    f"its model is a {type(getattr(tower, 'model', None)).__name__}, not a "
                    "transformers PreTrainedModel")
        width = getattr(tower.model.config, "hidden_size", None)
        if width != tower.dim:
            return (f"the {side} tower '{encoder}'",
                    f"its pooled output is {tower.dim} wide but config.hidden_size is "
                    f"{width}, the width VisionTextDualEncoderModel projects from")
    for side, adapter in (("vision", m.vision_adapter), ("text", m.text_adapter)):
        proj = projection(adapter)
        if proj is None:
            return (f"the {side} adapter '{rm.adapter.name}'",
                    "VisionTextDualEncoderModel's projections are single linear layers "
                    "(linear or identity adapters)")
        if proj[1] is not None:
            return (f"the bias of the {side} adapter '{rm.adapter.name}'",
                    "visual_projection and text_projection are nn.Linear(bias=False): train "
                    "with model.adapter.bias = false")
    text_pool = option(run, "text", "pooling")
    if text_pool != "pooler":
        return (f"text pooling '{text_pool}'",
                "get_text_features takes the text model's pooler_output (BERT-style: "
                "tanh(dense(first token))), which no weights turn into "
                f"'{text_pool}' pooling of last_hidden_state; train with "
                "model.text.pooling = 'pooler'")
    vision_pool = option(run, "vision", "pooling")
    model_type = getattr(m.vision.model.config, "model_type", "")
    if vision_pool == "mean" or (vision_pool == "cls" and model_type not in CLS_POOLERS):
        return (f"vision pooling '{vision_pool}' of a '{model_type}' model",
                "get_image_features takes pooler_output, which is the class token exactly "
                f"only for {' and '.join(CLS_POOLERS)} (identity pooler) and never a mean of "
                "patch tokens")
    return None


def cls_pooler_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of a ViT/DeiT config whose pooler passes the class token through unchanged."""
    config = copy.deepcopy(config)
    config.pooler_act = "linear"  # transformers' ACT2FN: LinearActivation (identity)
    config.pooler_output_size = config.hidden_size
    return config


class HFExporter(MappedExporter):
    """``mmfw export RUN --format hf``."""

    name = "hf"
    mismatch = staticmethod(mismatch)

    def export(self, run: mmfw.LoadedRun, output: Path) -> Path:
        from transformers import (
            AutoImageProcessor,
            VisionTextDualEncoderConfig,
            VisionTextDualEncoderModel,
            VisionTextDualEncoderProcessor,
        )

        self.check(run)
        m = run.model
        vision_state = dict(m.vision.model.state_dict())
        vision_config = m.vision.model.config
        if option(run, "vision", "pooling") == "cls":  # the pooler mmfw dropped, as identity
            vision_config = cls_pooler_config(vision_config)
            width = vision_config.hidden_size
            vision_state["pooler.dense.weight"] = torch.eye(width)
            vision_state["pooler.dense.bias"] = torch.zeros(width)
        scale, _ = logit_scale(run)
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision_config, m.text.model.config, projection_dim=m.embed_dim,
            logit_scale_init_value=scale)
        model = VisionTextDualEncoderModel(config=config).eval()
        model.vision_model.load_state_dict(vision_state, strict=True)
        model.text_model.load_state_dict(m.text.model.state_dict(), strict=True)
        with torch.no_grad():
            for layer, adapter in ((model.visual_projection, m.vision_adapter),
                                   (model.text_projection, m.text_adapter)):
                weight, _ = projection(adapter)
                layer.weight.copy_(weight)
            model.logit_scale.copy_(torch.tensor(scale))
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output)
        source = m.vision.source
        image_processor = AutoImageProcessor.from_pretrained(
            source.location, local_files_only=source.local_only)
        tokenizer = copy.deepcopy(m.text.tokenizer)
        # mmfw truncates at max_length: the saved tokenizer does so with truncation=True alone
        tokenizer.model_max_length = int(option(run, "text", "max_length"))
        VisionTextDualEncoderProcessor(image_processor=image_processor,
                                       tokenizer=tokenizer).save_pretrained(output)
        return output
