"""Generation as compiled phases, driven from a short host loop.

The phases are those of `decode.py`: `prefill_and_choose` (the prefill,
which also chooses the first new token from its own last hidden state), then
one `decode_segment` per bucket edge (a loop whose steps read the first
`edge` global slots), or `step_with_prefix` one token at a time when
streaming. Each phase is compiled once per shape for the backend:

- JAX: `jax.jit` over the model's variables as explicit state (the way
  KerasHub compiles generation).
- TensorFlow: `tf.function(jit_compile=True)`. Each segment is its own XLA
  program: TensorFlow 2.21 fails to compile one function holding three or
  more consecutive while loops ("Cannot find body function ... for While
  node").
- PyTorch: `torch_decode` prefills (prompts that fit in the ring; longer
  ones run the Keras layers), under `torch.inference_mode()`, and decodes with the
  layers' math on raw tensors and preallocated caches (measured faster on
  CPU than the eager layers). With
  `compile(jit_compile=True)` its step goes through `torch.compile`, once
  per shape and global bucket: faster per token, but the compile time
  dwarfs short generations, so eager is the default.

Between segments the host checks whether every row is done and stops early.

Each program records the decode path it took in `decode_path` (see
`DECODE_PATHS`), so a test can catch a model that silently falls back to
the portable step run eagerly (`tests/generation/test_decode_paths.py`).
"""

import functools
import itertools
import os

import keras
from keras import ops

from keras_gemma2.generation import torch_decode
from keras_gemma2.generation.decode import (
    bucket_edges,
    decode_segment,
    finish,
    prefill_and_choose,
    prefill_bucket,
    step_with_prefix,
)

# What `GenerationProgram.decode_path` holds after a call.
DECODE_PATHS = {
    "jax_jit": "the phases compiled with `jax.jit`",
    "tensorflow_xla": "the phases compiled with `tf.function(jit_compile=True)`",
    "torch_decoder": "`torch_decode.TorchDecoder`, eager",
    "torch_decoder_compiled": "`torch_decode.TorchDecoder`, through `torch.compile`",
    "portable_eager": "the portable phases (Keras layers), run eagerly",
}


def compiled_path(causal_lm):
    """The `DECODE_PATHS` key of what `compile_function` makes of a phase."""
    backend = keras.config.backend()
    if causal_lm.run_eagerly:
        return "portable_eager"
    return {"jax": "jax_jit", "tensorflow": "tensorflow_xla"}.get(
        backend, "portable_eager"
    )


class GenerationProgram:
    """Compiled phases of generation for one prefill length and stop tokens.

    Args:
        causal_lm: a `Gemma2CausalLM` with a compiled `sampler`.
        stop_token_ids: tuple of ints or `None`.
        prefill_length: static int, the prompts' bucketed length.

    Attributes:
        decode_path: `None` until called, then the `DECODE_PATHS` key of the
            path the last call decoded with.
    """

    def __init__(self, causal_lm, stop_token_ids, prefill_length):
        self.causal_lm = causal_lm
        self.stop_token_ids = stop_token_ids
        self.prefill_length = prefill_length
        self.decode_path = None
        self._compiled = {}

    def _phase(self, key, function):
        if key not in self._compiled:
            self._compiled[key] = compile_function(self.causal_lm, function)
        return self._compiled[key]

    def _prefill(self, inputs):
        """`(prompt_mask, max_length, state, decoder, token, matrices)`.

        `decoder` is the `torch_decode.TorchDecoder` that decodes on torch's
        fast path, else `None` (the compiled segments decode). On that path
        `state` is `decode.prefill`'s; otherwise the prefill also chose the
        token at the first position (`decode.prefill_and_choose`), `token`,
        `state` is one position on, and `matrices` are what the decode
        programs carry.
        """
        token_ids = ops.convert_to_tensor(inputs["token_ids"])
        padding_mask = ops.convert_to_tensor(inputs["padding_mask"])
        decoder, token, matrices = None, None, None
        if torch_decode.supports(self.causal_lm):
            import torch

            with torch.inference_mode():  # see `torch_decode`
                state, decoder = torch_decode.start(
                    self.causal_lm, token_ids, padding_mask, self.prefill_length
                )
            compiled = torch_decode.compiles(self.causal_lm)
            self.decode_path = "torch_decoder" + ("_compiled" if compiled else "")
        else:
            self.decode_path = compiled_path(self.causal_lm)
            run = self._phase(
                "prefill",
                lambda args: prefill_and_choose(
                    self.causal_lm, *args, self.prefill_length, self.stop_token_ids
                ),
            )
            state, token, matrices = run((token_ids, padding_mask))
        mask = ops.cast(padding_mask, "bool")
        return mask, token_ids.shape[1], state, decoder, token, matrices

    def __call__(self, inputs):
        """Complete `inputs` (`{"token_ids", "padding_mask"}`), as one batch."""
        prompt_mask, max_length, state, decoder, _, matrices = self._prefill(inputs)
        if decoder is not None:
            prompt = self._torch_decode(state, prompt_mask, decoder)
            return finish(prompt, prompt_mask, self.stop_token_ids)
        index = _shortest_prompt(inputs) + 1  # the prefill chose one token
        # Only a stop token ends rows early; without one, nothing waits for a
        # segment to finish before the next is dispatched.
        stops = self.stop_token_ids is not None
        for edge in bucket_edges(self.prefill_length, max_length):
            # A segment runs while its index <= edge: earlier ones are empty.
            if edge < index:
                continue
            if stops and bool(ops.convert_to_numpy(ops.all(state[-1]))):
                break
            run = self._phase(
                ("segment", edge),
                lambda args, edge=edge: decode_segment(
                    self.causal_lm,
                    *args[:2],
                    edge,
                    self.stop_token_ids,
                    matrices=args[2],
                ),
            )
            state = run((state, prompt_mask, matrices))
        return finish(state[0], prompt_mask, self.stop_token_ids)

    def stream(self, inputs):
        """Yield each new token id (int) of a one-row batch as it is sampled."""
        prompt_mask, max_length, state, decoder, token, matrices = self._prefill(inputs)
        if decoder is not None:
            for _, _, token in self._torch_tokens(state, prompt_mask, decoder):
                yield int(token[0])
            return
        length = _shortest_prompt(inputs)  # one row: its prompt
        if length < max_length:  # the prefill chose the token at `length`
            token = int(ops.convert_to_numpy(token)[0])
            yield token
            if self.stop_token_ids is not None and token in self.stop_token_ids:
                return
        edges = bucket_edges(self.prefill_length, max_length)
        for index in range(length + 1, max_length):
            edge = next(edge for edge in edges if edge >= index)
            run = self._phase(
                ("step", edge),
                lambda args, edge=edge: step_with_prefix(
                    self.causal_lm, *args[:2], edge, self.stop_token_ids, args[2]
                ),
            )
            state, token = run((state, prompt_mask, matrices))
            token = int(ops.convert_to_numpy(token)[0])
            yield token
            if self.stop_token_ids is not None and token in self.stop_token_ids:
                return

    def _torch_tokens(self, state, prompt_mask, decoder):
        """The torch fast path; yields `(prompt, done, token)` after each step."""
        prompt, _, index, done = state
        prompt = prompt.clone()  # written in place; the caller's ids stay intact
        edges = bucket_edges(self.prefill_length, prompt.shape[1])
        compiled = torch_decode.compiles(self.causal_lm)
        for position in range(int(index), prompt.shape[1]):
            # The compiled step reads a bucket of global slots (as the
            # segments of the other backends do); eager reads exactly.
            span = next(e for e in edges if e >= position) if compiled else None
            prompt, done, token = decoder.step(
                prompt, prompt_mask, position, done, self.stop_token_ids, span
            )
            yield prompt, done, token
            if self.stop_token_ids is not None and bool(done.all()):
                return

    def _torch_decode(self, state, prompt_mask, decoder):
        prompt = state[0]
        for step in self._torch_tokens(state, prompt_mask, decoder):
            prompt = step[0]
        # Written under `torch.inference_mode()`: a copy made outside it is
        # a normal tensor, which the caller may change in place.
        return prompt.clone()


def make_generate_function(causal_lm):
    """`fn(inputs, stop_token_ids=None) -> outputs`, one program per shape."""
    programs = {}

    def generate_function(inputs, stop_token_ids=None):
        program = program_for(causal_lm, programs, inputs, stop_token_ids)
        return program(inputs)

    generate_function.programs = programs
    return generate_function


def _shortest_prompt(inputs):
    """The shortest prompt's length: the first position generation writes."""
    return int(ops.convert_to_numpy(inputs["padding_mask"]).sum(axis=-1).min())


def program_for(causal_lm, programs, inputs, stop_token_ids):
    """The cached `GenerationProgram` for these inputs' prefill bucket."""
    if isinstance(stop_token_ids, list):
        stop_token_ids = tuple(stop_token_ids)
    mask = ops.convert_to_numpy(inputs["padding_mask"])
    max_length = mask.shape[1]
    prefill_length = prefill_bucket(int(mask.sum(axis=1).max()), max_length)
    key = (prefill_length, stop_token_ids)
    if key not in programs:
        programs[key] = GenerationProgram(causal_lm, stop_token_ids, prefill_length)
    return programs[key]


def compile_function(causal_lm, function):
    """Compile `function(args) -> outputs` (tensors in, tensors out) once per shape.

    `function` may read the model's variables and update its sampler's seed.
    """
    backend = keras.config.backend()
    if causal_lm.run_eagerly:
        return function
    if backend == "jax":
        return _jax_function(causal_lm, function)
    if backend == "tensorflow":
        import tensorflow as tf

        tensorflow_xla_flags()
        # No autograph: the phases branch and loop through `keras.ops`
        # (`cond`, `while_loop`), never on tensors in Python; converting
        # them cost a second of each `keras-gemma2 run` start.
        return tf.function(function, jit_compile=True, autograph=False)
    if backend == "torch":
        import torch

        def no_grad(args):
            with torch.no_grad():
                return function(args)

        return no_grad
    return function


# XLA (CPU) options for the generation programs. With its default copy
# insertion, XLA copied every loop-carried KV cache at each decode step even
# when nothing but the next step read it; region analysis proves the in-place
# write safe (2048-token context, per token: jax 0.10 15 -> 12 ms; TensorFlow
# 2.21 14 -> 11 ms). jax takes them per program (`compiler_options`),
# TensorFlow through `XLA_FLAGS` (`tensorflow_xla_flags`).
XLA_CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def tensorflow_xla_flags():
    """Give TensorFlow's XLA the `XLA_CPU_OPTIONS` through `XLA_FLAGS`.

    TensorFlow takes XLA options only from the `XLA_FLAGS` environment
    variable, which it reads once, at the process' first XLA compilation. So
    each option not already named there is appended (`--name=value`); a
    value the user set, `--xla_cpu_copy_insertion_use_region_analysis=false`
    included, wins. The options then apply to every XLA program the process
    compiles afterwards; they change where XLA copies buffers, never what a
    program computes. In a process that compiled an XLA program before its
    first generation (a `fit` first, say), they come too late and do nothing:
    set `XLA_FLAGS` before starting it. Measured on the benchmark's mid
    model at a 2048-token context (TensorFlow 2.21, CPU): 13.6-14.2 -> 10.7-11.0
    ms per decoded token, processes alternating.

    Returns:
        The options appended, as `--name=value` strings (empty when none).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    added = [
        f"--{name}={str(value).lower()}"
        for name, value in XLA_CPU_OPTIONS.items()
        if name not in flags
    ]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added


def _jax_function(causal_lm, function):
    import jax

    sampler = causal_lm.sampler
    options = XLA_CPU_OPTIONS if jax.default_backend() == "cpu" else None

    @functools.partial(jax.jit, compiler_options=options)
    def stateless(args, state):
        sampler_values, trainable, non_trainable = state
        mapping = itertools.chain(
            zip(sampler.variables, sampler_values, strict=True),
            zip(causal_lm.trainable_variables, trainable, strict=True),
            zip(causal_lm.non_trainable_variables, non_trainable, strict=True),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = function(args)
        new_sampler_values = [
            scope.get_current_value(v) if scope.get_current_value(v) is not None else v
            for v in sampler.variables
        ]
        return outputs, new_sampler_values

    def current_state():
        return (
            [v.value for v in sampler.variables],
            [v.value for v in causal_lm.trainable_variables],
            [v.value for v in causal_lm.non_trainable_variables],
        )

    def run(args):
        args = jax.tree_util.tree_map(ops.convert_to_tensor, args)
        outputs, sampler_values = stateless(args, current_state())
        # Only the sampler's seed state changes during generation.
        for variable, value in zip(sampler.variables, sampler_values, strict=True):
            variable.assign(value)
        return outputs

    def lower(args):
        """The `jax.stages.Lowered` program for `args` (to read its HLO)."""
        args = jax.tree_util.tree_map(ops.convert_to_tensor, args)
        return stateless.lower(args, current_state())

    run.lower = lower
    return run
