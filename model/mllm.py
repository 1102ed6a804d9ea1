"""The multimodal LLM (MLLM) behind captioning, target descriptions and the fused embedder f_M.

One loader (`load_mllm`) serves the demo's tiny random models and the production
checkpoints (Qwen2.5-VL-7B-Instruct, GME-Qwen2-VL-2B, ...): both are a folder or hub id
read with `from_pretrained`; only the config differs.
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, ProcessorMixin

from model.errors import PipelineError
from model.vision_attention import linear_patch_embed, set_vision_attention

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _image_only_processor_class(processor_cls):
    """The model's processor class, built without a video processor.

    Qwen-VL processors build a video processor that needs torchvision, which is not a
    dependency (images are all this pipeline feeds); the real checkpoints'
    preprocessor_config.json names Qwen2VLProcessor / Qwen2_5_VLProcessor, and
    `AutoProcessor` on them fails without torchvision. This subclass's signature has
    no video processor, so `from_pretrained` loads the tokenizer, the image processor
    (its PIL backend) and the chat template only.
    """

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    ImageOnlyProcessor.__name__ = f"ImageOnly{processor_cls.__name__}"
    return ImageOnlyProcessor


def load_processor(name_or_path: str) -> ProcessorMixin:
    """The processor of an MLLM checkpoint, chosen by its config's model_type (the class
    transformers registers for it), images only (see `_image_only_processor_class`)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    cls_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if cls_name is None or not hasattr(transformers, cls_name):
        raise PipelineError(
            f"{name_or_path}: no processor is registered for model_type {model_type!r}; "
            "expected a Qwen-VL family checkpoint (qwen2_vl, qwen2_5_vl)"
        )
    processor = _image_only_processor_class(getattr(transformers, cls_name)).from_pretrained(name_or_path)
    if processor.chat_template is None:
        # Qwen2-VL-era repositories (GME's) keep the template in tokenizer_config.json.
        processor.chat_template = processor.tokenizer.chat_template
    if processor.chat_template is None:
        raise PipelineError(
            f"{name_or_path}: no chat template (chat_template.json, .jinja or tokenizer_config.json)"
        )
    return processor


@dataclass
class MLLM:
    """A loaded MLLM: the model, its processor, where it lives and what it is called.

    preprocess_threads, normalize_on_device (conf models.<role>): the processor's work
    on the CPU (resize, rescale, normalise, cut into patches: ~14 ms a 448x448 image)
    bounds a GPU that embeds a batch in less time. With threads > 1 the batch is cut
    into that many parts processed at once (numpy and the tokenizer release the GIL);
    with normalize_on_device the processor leaves the pixels at 0-255 and the GPU
    rescales and normalises them (per channel, the slowest step on the CPU). Both give
    the processor's own inputs (tests/test_fast_paths.py).

    input_cache_rows (conf models.<role>): training meets the same rows epoch after
    epoch. `encode` given `image_keys` processes each row alone the first time, keeps
    it (the newest input_cache_rows rows), and merges a batch from the kept rows as the
    processor pads it: the same inputs, without the processor's time (a fifth of a
    fine-tuning step of the demo's tiny MLLM: bench/input_cache.py). 0: nothing kept.
    """

    model: torch.nn.Module
    processor: ProcessorMixin
    name: str
    device: torch.device
    image_min_pixels: int
    image_max_pixels: int
    preprocess_threads: int = 1
    normalize_on_device: bool = False
    input_cache_rows: int = 0

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def encode(self, conversations: Sequence[list], images: Sequence[Image.Image] | None,
               add_generation_prompt: bool, suffix: str = "", max_length: int = 0,
               image_keys: Sequence | None = None) -> dict:
        """Chat conversations (+ their images, in order) to model inputs, left-padded;
        max_length > 0 truncates each row to that many tokens (image tokens included).
        image_keys: one per row, naming the content of the row's image (None for a row
        without one); given, rows are kept and reused (input_cache_rows)."""
        texts = [
            self.processor.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=False)
            + suffix
            for c in conversations
        ]
        kwargs = dict(truncation=True, max_length=max_length) if max_length > 0 else {}
        if images:
            # Qwen-VL's pixel budget: shortest_edge/longest_edge hold min/max pixels.
            kwargs["size"] = {"shortest_edge": self.image_min_pixels, "longest_edge": self.image_max_pixels}
            if self.normalize_on_device:
                kwargs.update(do_rescale=False, do_normalize=False)
        reuse = image_keys is not None and self.input_cache_rows > 0
        parts = None if reuse else self._parts(texts, list(images or []))
        if reuse:
            batch = self._from_kept_rows(texts, list(images or []), list(image_keys), kwargs)
        elif len(parts) == 1:
            batch = self._process(*parts[0], kwargs)
        else:
            batch = _merge_left_padded(
                list(self._pool().map(lambda p: self._process(*p, kwargs), parts)),
                self.tokenizer.pad_token_id,
            )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if images and self.normalize_on_device:
            batch["pixel_values"] = self._normalize(batch["pixel_values"])
        return batch

    def _process(self, texts: list[str], images: list[Image.Image], kwargs: dict) -> dict:
        return dict(
            self.processor(text=texts, images=images or None, return_tensors="pt", padding=True, **kwargs)
        )

    def _from_kept_rows(self, texts: list[str], images: list[Image.Image], image_keys: list,
                        kwargs: dict) -> dict:
        if len(image_keys) != len(texts):
            raise ValueError(f"encode got {len(image_keys)} image keys for {len(texts)} rows")
        kept = self.__dict__.setdefault("_kept_rows", OrderedDict())
        token, rows, used = self.processor.image_token, [], 0
        for text, image_key in zip(texts, image_keys):
            own = images[used : used + text.count(token)]
            used += len(own)
            # The rendered text (instruction, prompt, suffix), what the image is and how
            # it is cut (truncation) decide a row's inputs.
            key = (text, image_key, kwargs.get("max_length", 0))
            row = kept.get(key)
            if row is None:
                row = kept[key] = self._process([text], own, kwargs)
                if len(kept) > self.input_cache_rows:
                    kept.popitem(last=False)
            else:
                kept.move_to_end(key)
            rows.append(row)
        return _merge_left_padded(rows, self.tokenizer.pad_token_id)

    def _parts(
        self, texts: list[str], images: list[Image.Image]
    ) -> list[tuple[list[str], list[Image.Image]]]:
        """At most preprocess_threads runs of consecutive rows, with the images they hold."""
        n = min(self.preprocess_threads, len(texts))
        if n <= 1:
            return [(texts, images)]
        token = self.processor.image_token
        bounds = np.linspace(0, len(texts), n + 1).round().astype(int)
        parts, used = [], 0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            k = sum(t.count(token) for t in texts[lo:hi])
            parts.append((texts[lo:hi], images[used : used + k]))
            used += k
        return parts

    def set_preprocessing(self, threads: int, normalize_on_device: bool) -> None:
        """Changes both settings of a loaded MLLM (benchmarks compare them on one model)."""
        self.preprocess_threads, self.normalize_on_device = threads, normalize_on_device
        self._executor = None

    def _pool(self) -> ThreadPoolExecutor:
        if getattr(self, "_executor", None) is None:
            self._executor = ThreadPoolExecutor(self.preprocess_threads, thread_name_prefix="preprocess")
        return self._executor

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """The processor's rescale and normalise, on the model's device. Qwen-VL's patch
        rows hold channel-major pixels (the vision tower reads them as C x T x p x p)."""
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean, device=pixels.device, dtype=torch.float32)[:, None]
        std = torch.tensor(ip.image_std, device=pixels.device, dtype=torch.float32)[:, None]
        x = pixels.float().view(pixels.shape[0], len(ip.image_mean), -1)
        return ((x * ip.rescale_factor - mean) / std).view(pixels.shape)


def _merge_left_padded(parts: list[dict], pad_id: int) -> dict:
    """The processor outputs of consecutive runs of rows as one batch: per-token tensors
    (the shape of input_ids) left-padded to the longest run, image tensors concatenated."""
    width = max(p["input_ids"].shape[1] for p in parts)
    out = {}
    # A part without images has no image tensors (pixel_values, image_grid_thw).
    for key in dict.fromkeys(k for p in parts for k in p):
        values = []
        for p in [p for p in parts if key in p]:
            v = p[key]
            if v.shape == p["input_ids"].shape and v.shape[1] < width:
                fill = pad_id if key == "input_ids" else 0
                v = torch.cat([v.new_full((v.shape[0], width - v.shape[1]), fill), v], dim=1)
            values.append(v)
        out[key] = torch.cat(values)
    return out


def load_mllm(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    image_min_pixels: int = 3136,
    image_max_pixels: int = 200704,
    attn_implementation: str = "sdpa",
    preprocess_threads: int = 1,
    normalize_on_device: bool = False,
    vision_attention: str = "per_image",
    device_map: str | None = None,
    input_cache_rows: int = 0,
) -> MLLM:
    """device_map "auto" shards the model over every GPU the process sees (a model larger
    than one GPU, such as the 72B describer); None puts it whole on `device`. On CUDA, a
    model whose weights exceed the memory it is given is refused before loading."""
    from model.memory import check_fits, visible_gpu_gib, weights_bytes

    if device.startswith("cuda"):
        gpus, gib = visible_gpu_gib()
        check_fits(
            f"{name_or_path} ({dtype} weights)", weights_bytes(name_or_path, dtype),
            gpus if device_map else min(gpus, 1), gib,
            "give its actor more GPUs (num_gpus_per_actor) and set models.<role>.device_map: auto",
        )
    # Left padding: the last position of every row is its real last token, which
    # both the fused embedding (last hidden state) and batched `generate` rely on.
    processor = load_processor(name_or_path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=torch_dtype(dtype), attn_implementation=attn_implementation,
        **({"device_map": device_map} if device_map else {}),
    )
    set_vision_attention(model, vision_attention)
    linear_patch_embed(model)
    if not device_map:
        model.to(device)
    model.eval()
    return MLLM(
        model,
        processor,
        name_or_path,
        model.get_input_embeddings().weight.device,
        image_min_pixels,
        image_max_pixels,
        preprocess_threads,
        normalize_on_device,
        input_cache_rows,
    )


def load_mllm_from_conf(m: dict) -> MLLM:
    """`load_mllm` from a `models.<role>` section of conf (a plain dict)."""
    return load_mllm(
        m["name_or_path"],
        dtype=m["dtype"],
        device=m["device"],
        image_min_pixels=m["image_min_pixels"],
        image_max_pixels=m["image_max_pixels"],
        attn_implementation=m["attn_implementation"],
        preprocess_threads=m["preprocess_threads"],
        normalize_on_device=m["normalize_on_device"],
        vision_attention=m["vision_attention"],
        device_map=m["device_map"],
        input_cache_rows=m["input_cache_rows"],
    )


def _user_turn(image: Image.Image | None, text: str | None) -> dict:
    content = []
    if image is not None:
        content.append({"type": "image"})
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


KV_CACHES = ("dynamic", "static", "static_compiled")


class Captioner:
    """Image -> caption with the MLLM's `generate` (greedy, so reruns agree).

    The paper's mixed-length strategy (section 6.1) needs a long detailed caption for
    most pairs and a short one for the rest; each is one prompt and one length limit.

    kv_cache (conf `caption.kv_cache`): "dynamic" grows the key/value cache token by
    token (transformers' default); "static" allocates it once at its final length;
    "static_compiled" also has transformers compile the one-token decoding step with
    torch.compile (on GPUs only), against per-token launch overhead (its figures are in
    docs/benchmarks.md). The static cache gives the same greedy tokens as the dynamic
    one (tests/test_fast_paths.py).
    """

    def __init__(self, mllm: MLLM, kv_cache: str = "dynamic"):
        if kv_cache not in KV_CACHES:
            raise ValueError(f"caption.kv_cache={kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
        self.mllm = mllm
        self.kv_cache = kv_cache

    @torch.inference_mode()
    def generate_ids(
        self,
        images: Sequence[Image.Image | None],
        prompts: Sequence[str],
        max_new_tokens: int,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """The new tokens, (B, <= max_new_tokens), padded after each row's end token.
        min_new_tokens > 0 holds the end token back (benchmarks of random weights)."""
        conversations = [[_user_turn(im, p)] for im, p in zip(images, prompts)]
        present = [im for im in images if im is not None]
        batch = self.mllm.encode(conversations, present, add_generation_prompt=True)
        tok = self.mllm.tokenizer
        cache = {}
        if self.kv_cache != "dynamic":
            cache = dict(cache_implementation="static", disable_compile=self.kv_cache == "static")
        out = self.mllm.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **cache,
        )
        return out[:, batch["input_ids"].shape[1] :]

    def generate(
        self, images: Sequence[Image.Image | None], prompts: Sequence[str], max_new_tokens: int
    ) -> list[str]:
        new_tokens = self.generate_ids(images, prompts, max_new_tokens)
        return [t.strip() for t in self.mllm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        return self.generate(images, [prompt] * len(images), max_new_tokens)


POSITION_IDS = ("sequential", "mrope")
SIDES = ("query", "candidate")


def pre_resize(image: Image.Image, min_pixels: int, max_pixels: int, factor: int) -> Image.Image:
    """GME's own first resize (gme_inference.py `fetch_image`, from qwen_vl_utils): each
    side rounded to a multiple of `factor` pixels, the area kept within
    [min_pixels, max_pixels], bicubic; the processor then resizes the result again to
    its pixel budget. Skipping it changes the pixels the vision tower sees."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


class FusedEmbedder:
    """f_M: an image, a text, or both -> a unit vector in the joint vision-language space.

    The input is an instruction-augmented chat sequence (a system turn carrying the
    instruction, a user turn carrying the image and/or text), as GME builds it; the
    embedding is the final hidden state of the last token, L2-normalised
    (fusion-diff section 3.1). The defaults in conf (`models.embedder`) make the
    vectors GME's own (tests/test_checkpoints.py compares them with a re-implementation
    of GME's published inference):

    - two instructions: candidates (gallery images, training targets) get GME's default
      system prompt, queries (composed queries, target descriptions, text queries) a
      task instruction; `side` picks one.
    - max_tokens: inputs truncated as GME truncates them (1,800 tokens).
    - position_ids "sequential": the language model sees positions 0..L-1 over the
      padded row, image tokens included, as GME's inference calls it (inputs_embeds and
      no position ids); "mrope" lets the model compute Qwen2-VL's 3-D positions.
    - pre_resize: GME's `fetch_image` resize before the processor's (`pre_resize`).

    overlap_parts (conf models.embedder.overlap_parts): a batch is embedded in that many
    parts of similar length (fewer pad tokens), the processor preparing part i+1 on a
    second thread while the model runs part i, so the CPU's share of the time can hide
    behind the GPU's. 1: one part, nothing overlapped. Same vectors
    (tests/test_fast_paths.py).
    """

    def __init__(self, mllm: MLLM, query_instruction: str, candidate_instruction: str, end_token: str,
                 overlap_parts: int = 1, max_tokens: int = 0, position_ids: str = "mrope",
                 pre_resize_pixels: tuple[int, int] | None = None, pre_resize_factor: int = 28):
        if position_ids not in POSITION_IDS:
            raise ValueError(f"position_ids={position_ids!r}: expected one of {', '.join(POSITION_IDS)}")
        self.mllm = mllm
        self.instructions = {"query": query_instruction, "candidate": candidate_instruction}
        # GME ends the sequence with an end-of-text token after the assistant header and
        # reads that position's state; the token is a config value.
        self.end_token = end_token
        self.overlap_parts = max(1, overlap_parts)
        self.max_tokens = max_tokens
        self.position_ids = position_ids
        self.pre_resize_pixels, self.pre_resize_factor = pre_resize_pixels, pre_resize_factor

    @classmethod
    def from_conf(cls, m: dict) -> "FusedEmbedder":
        """From the `models.embedder` section of conf (a plain dict)."""
        bounds = (m["pre_resize_min_pixels"], m["pre_resize_max_pixels"]) if m["pre_resize"] else None
        return cls(load_mllm_from_conf(m), m["query_instruction"], m["candidate_instruction"], m["end_token"],
                   m["overlap_parts"], m["max_tokens"], m["position_ids"], bounds, m["pre_resize_factor"])

    @property
    def dim(self) -> int:
        cfg = self.mllm.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    @torch.inference_mode()
    def embed(
        self, images: Sequence[Image.Image | None] | None = None, texts: Sequence[str | None] | None = None,
        side: str = "candidate", image_keys: Sequence | None = None,
    ) -> torch.Tensor:
        """(B, d_VL) float32 unit vectors, on the CPU; `side` picks the instruction.
        image_keys: one per item, naming its image's content: items of a part with the
        same key share one pass of the vision tower (`embed` writes f_M(I) and
        f_M(I, T) of each image in one call)."""
        images, texts, encode = self._inputs(images, texts, side)
        n = len(images)

        def vectors(rows: list[int], batch: dict) -> torch.Tensor:
            if image_keys is not None:
                batch = self._vision_once(batch, [image_keys[i] for i in rows if images[i] is not None])
            return self._unit_vectors(batch).cpu()  # waits on the GPU with the GIL released

        bounds = np.linspace(0, n, min(self.overlap_parts, n) + 1).round().astype(int).tolist()
        parts = list(zip(bounds[:-1], bounds[1:]))
        if len(parts) == 1:
            return vectors(list(range(n)), encode(list(range(n))))
        # Parts are cut from the batch in order of length (pixels, then text), so that
        # each pads its rows to a similar length; the vectors go back to input order.
        order = sorted(
            range(n),
            key=lambda i: (
                0 if images[i] is None else images[i].width * images[i].height,
                len(texts[i] or ""),
            ),
        )
        out = []
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch:
            upcoming = prefetch.submit(encode, order[parts[0][0]:parts[0][1]])
            for i, (lo, hi) in enumerate(parts):
                batch = upcoming.result()
                if i + 1 < len(parts):
                    upcoming = prefetch.submit(encode, order[parts[i + 1][0]:parts[i + 1][1]])
                out.append(vectors(order[lo:hi], batch))
        vectors = torch.empty(n, out[0].shape[1])
        vectors[torch.tensor(order)] = torch.cat(out)
        return vectors

    def trainable_vectors(
        self, images: Sequence[Image.Image | None] | None = None, texts: Sequence[str | None] | None = None,
        side: str | Sequence[str] = "candidate", image_keys: Sequence | None = None,
    ) -> torch.Tensor:
        """`embed`'s vectors with autograd on, left on the model's device: what
        fine-tuning (model/contrastive.py) differentiates. Same inputs, same vectors.
        side: one for every row, or one per row (a training step's queries and
        candidates of every task in one forward). image_keys: as `MLLM.encode`'s (rows
        met again reuse their inputs)."""
        images, _, encode = self._inputs(images, texts, side, image_keys)
        batch = encode(list(range(len(images))))
        if image_keys is not None:
            batch = self._vision_once(batch, [k for k, im in zip(image_keys, images) if im is not None])
        return self._unit_vectors(batch)

    def _vision_once(self, batch: dict, keys: list) -> dict:
        """The batch with each distinct image (by its key) through the vision tower once:
        a fine-tuning step, and `embed`, meet each image alone and in its pair. The tower's
        features go to the model as its `mm_encoder_outputs`, one per image slot, so the
        language model sees what it would have, and the gradient of every slot reaches
        the one forward of its image."""
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        if "pixel_values" not in batch or len(first) == len(keys):
            return batch
        unique = sorted(first.values())
        slot = {keys[i]: j for j, i in enumerate(unique)}
        grid = batch["image_grid_thw"]
        pieces = batch["pixel_values"].split(grid.prod(-1).tolist())
        features = self.mllm.model.base_model.get_image_features(
            torch.cat([pieces[i] for i in unique]), grid[unique], return_dict=True)
        features.pooler_output = tuple(features.pooler_output[slot[k]] for k in keys)
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        return {**rest, "mm_encoder_outputs": {"image": features}}

    def _inputs(self, images, texts, side: str | Sequence[str], image_keys: Sequence | None = None):
        """(images, texts, encode): the checked items, and a function from a list of item
        indices to the model inputs of those items. side: one for all, or one per item."""
        n = len(images) if images is not None else len(texts)
        sides = [side] * n if isinstance(side, str) else list(side)
        for s in dict.fromkeys(sides):
            if s not in SIDES:
                raise ValueError(f"embed side={s!r}: expected one of {', '.join(SIDES)}")
        if len(sides) != n:
            raise ValueError(f"embed got {len(sides)} sides for {n} items: one, or one per item")
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts):
            raise ValueError(f"embed got {len(images)} images and {len(texts)} texts: one of each per item")
        for im, t in zip(images, texts):
            if im is None and not t:
                raise ValueError("embed: every item needs an image, a text or both")
        if self.pre_resize_pixels is not None:
            images = [None if im is None else pre_resize(im, *self.pre_resize_pixels, self.pre_resize_factor)
                      for im in images]
        conversations = [
            [{"role": "system", "content": [{"type": "text", "text": self.instructions[s]}]},
             _user_turn(im, t)]
            for im, t, s in zip(images, texts, sides)
        ]

        def encode(rows: list[int]) -> dict:
            present = [images[i] for i in rows if images[i] is not None]
            keys = None if image_keys is None else [image_keys[i] for i in rows]
            return self.mllm.encode(
                [conversations[i] for i in rows], present, add_generation_prompt=True, suffix=self.end_token,
                max_length=self.max_tokens, image_keys=keys,
            )

        return images, texts, encode

    def _unit_vectors(self, batch: dict) -> torch.Tensor:
        # The base model (no LM head): its last_hidden_state is the final-norm output GME
        # reads, without the vocabulary projection of every position (151k x d_VL a
        # token, ~6% of the work) or every layer's states.
        if self.position_ids == "sequential":
            rows, length = batch["input_ids"].shape
            positions = torch.arange(length, device=batch["input_ids"].device)
            batch = {**batch, "position_ids": positions.view(1, 1, -1).expand(3, rows, length)}
        out = self.mllm.model.base_model(**batch, use_cache=False)
        return F.normalize(out.last_hidden_state[:, -1, :].float(), dim=-1)


# The embedder settings a vector depends on besides the weights (`embedder_id`).
VECTOR_SETTINGS = (
    "query_instruction", "candidate_instruction", "end_token", "max_tokens", "position_ids",
    "pre_resize", "pre_resize_min_pixels", "pre_resize_max_pixels", "pre_resize_factor",
    "image_min_pixels", "image_max_pixels",
)


# Written by `finetune_embedder` beside the embedder it exports: which run and step made
# the weights. A new fine-tuning run at the same path changes it, and so the embedder's id.
FINETUNE_FILE = "finetune.json"


def embedder_id(m: dict) -> str:
    """What the `model` column of a vector names: the checkpoint and a digest of the
    settings that change its vectors (and of the folder's FINETUNE_FILE when it has
    one), so that changing an instruction, the pixel budget or the fine-tuned weights
    re-embeds (the incremental stages compare this string)."""
    import hashlib
    import json
    import os

    settings = json.dumps({k: m[k] for k in VECTOR_SETTINGS}, sort_keys=True)
    made_by = os.path.join(m["name_or_path"], FINETUNE_FILE)
    if os.path.isfile(made_by):
        with open(made_by) as f:
            settings += f.read()
    return f"{m['name_or_path']}#{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
