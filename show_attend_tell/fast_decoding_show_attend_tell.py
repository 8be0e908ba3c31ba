"""
The fast inference path of the decoder: the same function as `ShowAttendTellDecoder.step`, computed faster
when no gradients are recorded. The model enters it from one place, `ShowAttendTellDecoder.forward`
(`inference_forward` below); with `decoder.fast_inference = False` it computes the plain step instead.

What it does differently from the plain step, each measured in `benchmarks/` (with and without, same run):

- prepared weights (`InferenceWeights`): the decoder's weights cast once to the compute dtype and stacked so
  that one product of the LSTM state serves the attention query `W_h h`, the gate `f_beta(h)` and the LSTM's
  recurrent term; on a CPU in bf16, stored in oneDNN's own layout (prepacked);
- the attention scores written into one buffer reused from step to step (`attention_scores_into`), or
  compiled into one kernel with `torch.compile` (`decoder.fuse_attention_scores`, off by default: the first
  call compiles);
- under bf16 autocast: float32 LSTM state, attention and cell, and the logits of each row's `2 x num_beams`
  likeliest words (the only ones beam search can pick from that row) recomputed in float32;
- captured steps (`decoder.capture_steps`, off by default, meant for CUDA devices; not yet measured on a GPU):
  every step after the first runs the same step compiled by torch, `torch.compile(mode="reduce-overhead")`
  (`compiled_step`), which on a GPU records each step shape once as a CUDA graph and replays it; on a CPU
  inductor compiles the step and no graph is used.

Nothing here is global or keyed by object ids: what is prepared for a decoder lives in its
`inference_memo` (dropped by copies and pickles), what is prepared for one decoding in its cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .modeling_show_attend_tell import DecoderOutput, ShowAttendTellCache

# oneDNN's products with weights stored in its own layout, used for bf16 decoding on a CPU
PACKED_BF16_PRODUCTS = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


class InferenceCache(ShowAttendTellCache):
    """
    `ShowAttendTellCache` with what one fast decoding prepares once: `compute_features` (the features in the
    dtype the step multiplies them in), the weights of the step and a scratch buffer for the attention.
    A plain cache continues on the fast path and an `InferenceCache` on the plain path.
    """

    def __init__(self, *args, compute_features: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_features = compute_features
        self.scratch: torch.Tensor | None = None
        self.inference_weights: InferenceWeights | None = None

    def __getstate__(self) -> dict:
        # prepared weights can hold oneDNN-packed tensors, which cannot be copied; the decoder remakes them
        return {**self.__dict__, "inference_weights": None}


class _DecoderMemo:
    """What a decoder keeps between decodings: its prepared weights and, with `capture_steps`, its compiled step
    (made for `compiled_weights`, the prepared weights it reads)."""

    def __init__(self) -> None:
        self.weights_key: tuple | None = None
        self.weights: InferenceWeights | None = None
        self.compiled_step: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self.compiled_weights: InferenceWeights | None = None


def _memo(decoder) -> _DecoderMemo:
    if decoder.inference_memo is None:
        decoder.inference_memo = _DecoderMemo()
    return decoder.inference_memo


# --------------------------------------------------------------------------------------------------
# Attention scores
# --------------------------------------------------------------------------------------------------


def attention_scores(
    keys: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """
    `w^T relu(keys + query) + b` as one expression: keys (images, num_pixels, attention_dim), query (images,
    rows_per_image, attention_dim), weight (attention_dim,), bias () -> (images, rows_per_image, num_pixels).
    What `fused_attention_scores` compiles.
    """
    return (torch.relu(keys.unsqueeze(1) + query.unsqueeze(2)) * weight).sum(-1) + bias


@functools.cache
def _compiled_attention_scores() -> Callable[..., torch.Tensor]:
    # made on first use: importing torch's compiler is slow, and most decodings never need it (torch keeps
    # what it compiles for a function process-wide anyway)
    return torch.compile(attention_scores, dynamic=True)


def fused_attention_scores(
    keys: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`attention_scores` compiled into one kernel (compiled on first use, for any shape)."""
    return _compiled_attention_scores()(keys, query, weight, bias)


def attention_scores_into(
    scratch: torch.Tensor | None,
    keys: torch.Tensor,
    query: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `attention_scores` with its `(images, rows_per_image, num_pixels, attention_dim)` intermediate (64 MB in
    float32 for 32 images x 5 beams) written into `scratch`, the buffer the previous step returned, rather than
    into fresh memory at every step. All tensors in one dtype; no gradients.

    Returns the scores `(images, rows_per_image, num_pixels)` and the buffer to pass to the next call.
    """
    images, num_pixels, attention_dim = keys.shape
    size = images * query.shape[1] * num_pixels * attention_dim
    if scratch is None or scratch.numel() < size or scratch.dtype != keys.dtype:
        scratch = keys.new_empty(size)
    hidden = scratch[:size].view(images, query.shape[1], num_pixels, attention_dim)
    torch.add(keys.unsqueeze(1), query.unsqueeze(2), out=hidden).relu_()
    scores = torch.mv(hidden.view(-1, attention_dim), weight).view(images, query.shape[1], num_pixels)
    return scores.add_(bias), scratch


# --------------------------------------------------------------------------------------------------
# Prepared weights
# --------------------------------------------------------------------------------------------------


def _version_of(tensor: torch.Tensor) -> int:
    """The version counter of a tensor (bumped by in-place changes); -1 for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class InferenceWeights:
    """
    The decoder's weights laid out for the inference step, in its compute dtype, made once and reused by
    every step and every decoding until a parameter changes.

    The LSTM state `h` enters three products at each step (the attention query `W_h h`, the gate
    `f_beta(h)` and the LSTM's recurrent term `W_hh h`): they are stacked into one matrix, so one product
    serves all three. The recurrent term carries both LSTM biases.
    """

    def __init__(self, decoder, dtype: torch.dtype, prepack: bool) -> None:
        attention, lstm = decoder.attention, decoder.lstm
        with torch.no_grad():
            self.hidden_weight = torch.cat(
                [attention.decoder_projection.weight, decoder.gate.weight, lstm.weight_hh]
            ).to(dtype)
            self.hidden_bias = torch.cat(
                [attention.decoder_projection.bias, decoder.gate.bias, lstm.bias_hh + lstm.bias_ih]
            ).to(dtype)
            self.input_weight = lstm.weight_ih.detach().to(dtype)
            self.embedding = decoder.embedding.weight.detach().to(dtype)
            self.output_weight = decoder.output_layer.weight.detach().to(dtype)
            self.output_bias = decoder.output_layer.bias.detach().to(dtype)
            # attention scores, the LSTM cell and the initial state are computed in float32
            self.score_weight = attention.score.weight.detach().float().reshape(-1)
            self.score_bias = attention.score.bias.detach().float().reshape(())
            self.init_weight = torch.cat([decoder.init_hidden.weight, decoder.init_cell.weight]).float()
            self.init_bias = torch.cat([decoder.init_hidden.bias, decoder.init_cell.bias]).float()
            # the output layer in float32 as well, for the likeliest words of a low-precision step
            low_precision = dtype not in (torch.float32, torch.float64)
            self.exact_output_weight = decoder.output_layer.weight.detach().float() if low_precision else None
            self.exact_output_bias = decoder.output_layer.bias.detach().float() if low_precision else None
        self.dtype = dtype
        self.packed = {}
        on_cpu = self.input_weight.device.type == "cpu"
        if prepack and on_cpu and dtype == torch.bfloat16:
            # oneDNN's own layout of a weight matrix: a product then reads it as it is instead of reordering
            # the whole matrix at every call (same results)
            for name in ("hidden", "input", "output"):
                self.packed[name] = torch.ops.mkldnn._reorder_linear_weight(getattr(self, f"{name}_weight"))
                setattr(self, f"{name}_weight", None)  # only the packed copy is read
        self.attention_dim = attention.decoder_projection.out_features
        self.encoder_dim = decoder.gate.out_features

    def product(
        self,
        name: str,
        inputs: torch.Tensor,
        bias: torch.Tensor | None = None,
        add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`inputs @ weight.T + bias + add` with the weight matrix called `name` (hidden, input or output)."""
        packed = self.packed.get(name)
        if packed is not None:
            if add is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(
                    inputs, add.contiguous(), packed, bias, "add"
                )
            return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")
        weight = getattr(self, f"{name}_weight")
        if add is not None:
            return torch.addmm(add if bias is None else add + bias, inputs, weight.t())
        return F.linear(inputs, weight, bias)


def inference_weights(decoder, dtype: torch.dtype) -> InferenceWeights:
    """The decoder's prepared weights for `dtype`, remade when a parameter is replaced, moved or modified in
    place (which bumps its version counter). Prepacked where `PACKED_BF16_PRODUCTS` (the benchmark turns it off
    to measure what it buys), except with `capture_steps`: inductor compiles oneDNN's products of packed weights
    only for weights it packed itself (graph constants, under its `freezing` option), not for weights passed in,
    so the compiled step multiplies plain matrices."""
    prepack = PACKED_BF16_PRODUCTS and not decoder.capture_steps
    key = (
        dtype,
        prepack,
        *((p.data_ptr(), _version_of(p), p.dtype, p.device, p.shape) for p in decoder.parameters()),
    )
    memo = _memo(decoder)
    if memo.weights_key != key:
        memo.weights, memo.weights_key = InferenceWeights(decoder, dtype, prepack), key
    return memo.weights


def compute_dtype(decoder, device_type: str) -> torch.dtype:
    """The dtype of the inference step's matrix products: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return decoder.output_layer.weight.dtype


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


def inference_step(
    input_ids: torch.LongTensor,
    keys: torch.Tensor,
    compute_features: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    weights: InferenceWeights,
    scratch: torch.Tensor | None,
    exact_logits: int,
    fused_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """
    `ShowAttendTellDecoder.step` and the output layer for inference: input_ids (rows,), keys (images,
    num_pixels, attention_dim) float32, compute_features (images, num_pixels, encoder_dim) in the compute
    dtype, hidden and cell (rows, decoder_dim) float32 -> logits, alpha, hidden, cell, scratch. In a low
    precision, the `exact_logits` largest logits of each row are computed in float32 (`exact_top_logits`).
    The attention scores are written into `scratch` (`attention_scores_into`), or with `fused_scores`
    compiled into one kernel (`fused_attention_scores`).
    The LSTM cell is `nn.LSTMCell`'s equations on the stacked products: `torch._VF.lstm_cell` would repeat
    the recurrent product that the stacked one already did.
    """
    images, rows = keys.shape[0], input_ids.shape[0]
    attention_dim, encoder_dim = weights.attention_dim, weights.encoder_dim
    # attention query, gate and recurrent term of the LSTM: one product
    from_hidden = weights.product("hidden", hidden.to(weights.dtype), weights.hidden_bias)
    query = from_hidden[:, :attention_dim].float().view(images, rows // images, attention_dim)
    if torch.compiler.is_compiling():
        # the whole step is being compiled (`compiled_step`): inductor fuses the plain expression itself, and a
        # buffer kept from call to call would only be in its way
        scores = attention_scores(keys, query, weights.score_weight, weights.score_bias)
    elif fused_scores:
        scores = fused_attention_scores(keys, query, weights.score_weight, weights.score_bias)
    else:
        scores, scratch = attention_scores_into(
            scratch, keys, query, weights.score_weight, weights.score_bias
        )
    alpha = scores.softmax(dim=-1)  # (images, rows_per_image, num_pixels)
    context = torch.bmm(alpha.to(weights.dtype), compute_features).view(-1, encoder_dim)
    alpha = alpha.view(rows, -1)
    gate = torch.sigmoid(from_hidden[:, attention_dim : attention_dim + encoder_dim])
    lstm_input = torch.cat([F.embedding(input_ids, weights.embedding), gate * context], dim=1)
    gates = weights.product("input", lstm_input, add=from_hidden[:, attention_dim + encoder_dim :])
    input_gate, forget_gate, cell_gate, output_gate = gates.float().chunk(4, dim=1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
    hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
    logits = weights.product("output", hidden.to(weights.dtype), weights.output_bias)
    if weights.exact_output_weight is not None and exact_logits > 0:
        logits = exact_top_logits(logits, hidden, weights, exact_logits)
    return logits, alpha, hidden, cell, scratch


def exact_top_logits(
    logits: torch.Tensor, hidden: torch.Tensor, weights: InferenceWeights, count: int
) -> torch.Tensor:
    """
    Low-precision logits (rows, vocab_size) -> float32 logits whose `count` largest per row are computed
    again in float32, from the float32 LSTM output and output layer. A bf16 logit is rounded to 8 significant
    bits: off by up to 0.03 to 0.06 at a trained captioner's likely words (10 to 20), more than the gap
    between many pairs of candidate captions; the rest keep bf16's precision, which the softmax barely feels.
    """
    top = logits.topk(min(count, logits.shape[1]), dim=1, sorted=False).indices
    exact = torch.baddbmm(
        weights.exact_output_bias[top].unsqueeze(2), weights.exact_output_weight[top], hidden.unsqueeze(2)
    )
    return logits.float().scatter_(1, top, exact.squeeze(2))


# --------------------------------------------------------------------------------------------------
# Captured steps: the step compiled by torch (CUDA graphs on a GPU)
# --------------------------------------------------------------------------------------------------


def compiled_step(decoder, weights: InferenceWeights) -> Callable[..., tuple[torch.Tensor, ...]]:
    """
    `inference_step` with these prepared weights, compiled with `torch.compile(mode="reduce-overhead",
    dynamic=False)` (`decoder.capture_steps`): (input_ids, keys, compute_features, hidden, cell, exact_logits)
    -> logits, alpha, hidden, cell. On a GPU torch records each step shape once as a CUDA graph and replays it
    (one launch instead of the step's few dozen kernels); a replay writes its outputs where the previous replay
    wrote its own, so the caller copies what it keeps. On a CPU inductor compiles the step (a C++ compiler is
    needed) and no graph is used.

    One compiled function per decoder, kept in its memo and made again when its prepared weights are. Each step
    shape (images, rows) and dtype is compiled once, as a CUDA graph is recorded once per shape. Torch compiles
    the step's code at most `torch._dynamo.config.recompile_limit` times (8) in a process, all decoders
    together, and runs further shapes uncompiled.
    """
    memo = _memo(decoder)
    if memo.compiled_step is None or memo.compiled_weights is not weights:
        if weights.embedding.device.type == "cuda":
            # CUDA graphs copy their inputs into memory of their own at every replay, except those marked as
            # staying where they are: the weights do, for as long as this function lives (a step whose weights
            # moved is recorded again)
            for tensor in vars(weights).values():
                if isinstance(tensor, torch.Tensor):
                    torch._dynamo.mark_static_address(tensor, guard=False)

        def step(
            input_ids: torch.LongTensor,
            keys: torch.Tensor,
            compute_features: torch.Tensor,
            hidden: torch.Tensor,
            cell: torch.Tensor,
            exact_logits: int,
        ) -> tuple[torch.Tensor, ...]:
            outputs = inference_step(
                input_ids, keys, compute_features, hidden, cell, weights, None, exact_logits
            )
            return outputs[:4]

        memo.compiled_step = torch.compile(step, mode="reduce-overhead", dynamic=False)
        memo.compiled_weights = weights
    return memo.compiled_step


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def inference_forward(
    decoder,
    input_ids: torch.LongTensor,
    features: torch.Tensor,
    cache: ShowAttendTellCache | None,
) -> DecoderOutput:
    """`ShowAttendTellDecoder.forward` without gradients: the same outputs, computed as described above."""
    rows, steps = input_ids.shape
    device_type = input_ids.device.type
    dtype = compute_dtype(decoder, device_type)
    weights = getattr(cache, "inference_weights", None)
    if weights is None or weights.dtype != dtype:
        weights = inference_weights(decoder, dtype)
    features = features if cache is None else cache.features
    rows_per_image = rows // features.shape[0]
    compute_features = getattr(cache, "compute_features", None)
    if compute_features is None or compute_features.dtype != weights.dtype:
        # Kept in its memory layout: the batched products read (images, num_pixels, encoder_dim) as well as
        # its transpose, which is what a channels-first encoder's output is.
        compute_features = features.to(weights.dtype)
        if not (compute_features.is_contiguous() or compute_features.transpose(1, 2).is_contiguous()):
            compute_features = compute_features.contiguous()
    if cache is None:
        # The attention keys are made under the caller's autocast, through the module (hooks see it).
        keys = decoder.attention.project_features(compute_features).float()
        with torch.autocast(device_type, enabled=False):
            # the mean feature as a matrix product: a reduction over the middle dimension is slow
            ones = compute_features.new_ones(1, 1, compute_features.shape[1])
            mean_features = torch.matmul(ones, compute_features).squeeze(1).float() / ones.shape[-1]
            hidden, cell = F.linear(mean_features, weights.init_weight, weights.init_bias).chunk(2, dim=1)
        cache = ShowAttendTellCache(
            features,
            keys,
            hidden.repeat_interleave(rows_per_image, 0),
            cell.repeat_interleave(rows_per_image, 0),
        )
    keys = cache.projected_features.float()
    hidden, cell, scratch = cache.hidden.float(), cache.cell.float(), getattr(cache, "scratch", None)
    exact_logits = 2 * rows_per_image  # beam search picks among 2 x num_beams words

    all_logits, all_alphas, all_hidden = [], [], []
    with torch.autocast(device_type, enabled=False):
        if decoder.capture_steps and steps == 1 and cache.seq_length > 0:  # every step after the first
            step = compiled_step(decoder, weights)
            # A new step begins: the previous replay's outputs may be overwritten, and this one's are copied
            # out, since the caller keeps them (logits and attention in its outputs, the state in the cache).
            torch.compiler.cudagraph_mark_step_begin()
            # generate() passes the last column of its growing ids, whose stride grows with it: a step compiled
            # for fixed shapes would be compiled again at every step
            words = input_ids[:, 0].contiguous()
            outputs = step(
                words, keys, compute_features, hidden.contiguous(), cell.contiguous(), exact_logits
            )
            logits, alpha, hidden, cell = (output.clone() for output in outputs)
            all_logits, all_alphas, all_hidden = [logits], [alpha], [hidden]
        else:
            for t in range(steps):
                logits, alpha, hidden, cell, scratch = inference_step(
                    input_ids[:, t],
                    keys,
                    compute_features,
                    hidden,
                    cell,
                    weights,
                    scratch,
                    exact_logits,
                    decoder.fuse_attention_scores,
                )
                all_logits.append(logits)
                all_alphas.append(alpha)
                all_hidden.append(hidden)
    new_cache = InferenceCache(
        cache.features, keys, hidden, cell, cache.seq_length + steps, compute_features=compute_features
    )
    new_cache.scratch, new_cache.inference_weights = scratch, weights
    if steps == 1:  # generate()'s steps: no copies
        stacked = [values[0].unsqueeze(1) for values in (all_logits, all_alphas, all_hidden)]
    else:
        stacked = [torch.stack(values, dim=1) for values in (all_logits, all_alphas, all_hidden)]
    return DecoderOutput(*stacked, new_cache)
