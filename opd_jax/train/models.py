"""Build the teacher and the student a run config asks for (read once at the entry point)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.config.schema import ModelSpec
from opd_jax.model import decoder
from opd_jax.model.assets import default_teacher
from opd_jax.model.byte_tokenizer import ByteTokenizer
from opd_jax.model.config import ModelConfig
from opd_jax.model.derive import derive_student, random_student
from opd_jax.model.dtypes import cast_floating
from opd_jax.model.fingerprint import tokenizer_fingerprint
from opd_jax.model.loading import Model, check_same_vocab, load_model
from opd_jax.model.lora import init_lora
from opd_jax.model.tokenizer import load_tokenizer
from opd_jax.teacher.router import TeacherRouter
from opd_jax.teacher.source import LocalTeacher, open_teacher_source, source_kind
from opd_jax.train.state import StudentSpec

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Models:
    """Everything the stages need about the models.

    ``trainable``: the student's trainable tree (params, or LoRA weights over ``frozen``);
    ``teacher``: the separate teacher (OPD, cold start, seq-KD; OPSD uses the student itself),
    ``None`` when ``teacher.source`` is a service URL or a cache directory: then
    ``teacher_source`` answers for it (:class:`~opd_jax.teacher.source.TeacherSource`).
    """

    student: StudentSpec
    trainable: Any
    frozen: Any
    teacher: Model | None
    tokenizer: Any
    teacher_source: Any = None


def load_source(spec: ModelSpec, seed: int) -> Model:
    """``"default"`` (embedded SmolLM2-135M-Instruct), ``"random"`` (tiny random model with a byte
    tokenizer, sized by ``derive``), or a path to a Hugging Face folder / ``.gguf`` file."""
    if spec.source == "default":
        return default_teacher(spec.dtype)
    if spec.source == "random":
        tok = ByteTokenizer()
        d = spec.derive
        sizes = {k: getattr(d, k) for k in ("n_layers", "d_model", "ffn_dim", "n_heads",
                                            "n_kv_heads", "head_dim")
                 if d is not None and getattr(d, k) is not None}
        config = ModelConfig(vocab_size=tok.vocab_size, max_position=4096, **sizes)
        params = decoder.init_params(config, jax.random.key(seed), _DTYPES[spec.dtype])
        return Model(config, params, tok)
    model = load_model(spec.source, spec.dtype)
    if spec.tokenizer:
        model = model.replace(tokenizer=load_tokenizer(spec.tokenizer))
    return model


def derive(model: Model, spec: ModelSpec, seed: int) -> Model:
    """Apply ``spec.derive`` (layer subset or smaller random init on the same vocabulary)."""
    d = spec.derive
    if d is None or spec.source == "random":
        return model
    if d.random_init:
        sizes = {k: getattr(d, k) for k in ("n_layers", "d_model", "ffn_dim", "n_heads",
                                            "n_kv_heads", "head_dim") if getattr(d, k) is not None}
        config, params = random_student(model.config, jax.random.key(seed), teacher_params=model.params,
                                        dtype=_DTYPES[spec.dtype], **sizes)
        return Model(config, params, model.tokenizer)
    if d.keep_layers or d.keep_every or d.drop_layers:
        config, params = derive_student(model.config, model.params, keep_layers=d.keep_layers,
                                        keep_every=d.keep_every, drop_layers=d.drop_layers)
        return Model(config, params, model.tokenizer)
    return model


def with_execution(model: Model, spec: ModelSpec) -> Model:
    """``model`` with the spec's attention implementation and block size in its config."""
    return model.replace(config=model.config.replace(attention=spec.attention,
                                                     attention_block=spec.attention_block))


def student_base(teacher_spec: ModelSpec, student_spec: ModelSpec, *, seed: int,
                 teacher: Model | None = None) -> Model:
    """The student before training: its source (the teacher's, when both name the same one)
    derived by ``student_spec.derive``, with the spec's execution settings; no LoRA.

    ``teacher``: the already loaded (and derived) teacher, reused when the student shares its
    source and the teacher was not derived; otherwise the source is loaded here (export loads
    only the student this way)."""
    same_source = (student_spec.source == teacher_spec.source and student_spec.dtype ==
                   teacher_spec.dtype and student_spec.source != "random"
                   and student_spec.tokenizer == teacher_spec.tokenizer)
    if same_source:
        base = (teacher if teacher is not None and not teacher_spec.derive
                else load_source(teacher_spec, seed))
    else:
        base = load_source(student_spec, seed + 1)
    return with_execution(derive(base, student_spec, seed + 1), student_spec)


def as_teacher(model: Model, spec: ModelSpec) -> Model:
    """A loaded (and derived) model as a teacher scores with it: the spec's execution settings,
    its weights cast to ``precision`` (a teacher keeps no master weights)."""
    model = with_execution(model, spec)
    if spec.precision not in (None, spec.dtype):
        model = model.replace(params=cast_floating(model.params, _DTYPES[spec.precision]))
    return model


def load_teacher_model(spec: ModelSpec, seed: int) -> Model:
    """The teacher ``spec`` names, loaded, derived and made a teacher (:func:`as_teacher`)."""
    return as_teacher(derive(load_source(spec, seed), spec, seed), spec)


def build_models(teacher_spec: ModelSpec, student_spec: ModelSpec, *, seed: int,
                 remat: str | None = None, teachers: tuple = ()) -> Models:
    """Load the teacher, load (or reuse) and derive the student, add LoRA, check the vocabulary.

    Each model's config carries its spec's ``attention`` / ``attention_block``; the student runs
    with ``remat`` (default ``student_spec.remat``) and its spec's ``precision`` (a compute dtype
    over its stored parameters: mixed precision); a teacher's ``precision`` casts its weights."""
    remat = student_spec.remat if remat is None else remat
    if teachers or source_kind(teacher_spec.source) != "model":
        return _with_teacher_source(teacher_spec, student_spec, seed=seed, remat=remat,
                                    teachers=teachers)
    teacher = derive(load_source(teacher_spec, seed), teacher_spec, seed)
    student = student_base(teacher_spec, student_spec, seed=seed, teacher=teacher)
    teacher = as_teacher(teacher, teacher_spec)
    check_same_vocab(teacher, student)
    tokenizer = student.tokenizer or teacher.tokenizer
    if tokenizer is None:
        raise ValueError("neither the teacher nor the student came with a tokenizer; set "
                         "student.tokenizer to a tokenizer.json / .model / .gguf path")
    return _student_models(student, student_spec, teacher, tokenizer, seed=seed, remat=remat)


def _student_models(student: Model, student_spec: ModelSpec, teacher: Model | None, tokenizer,
                    *, seed: int, remat: str) -> Models:
    compute = (student_spec.precision if student_spec.precision not in (None, student_spec.dtype)
               else None)
    lora = student_spec.lora
    if lora.enabled:
        adapters = init_lora(student.config, jax.random.key(seed + 2), rank=lora.rank,
                             alpha=lora.alpha, targets=lora.targets,
                             dtype=_DTYPES[student_spec.dtype])
        spec = StudentSpec(student.config, lora_scale=adapters.scale, remat=remat,
                           compute_dtype=compute)
        # the frozen base has no master role: stored in the compute dtype
        frozen = cast_floating(student.params, _DTYPES[compute]) if compute else student.params
        return Models(spec, adapters.weights, frozen, teacher, tokenizer)
    return Models(StudentSpec(student.config, remat=remat, compute_dtype=compute), student.params,
                  None, teacher, tokenizer)


def _with_teacher_source(teacher_spec: ModelSpec, student_spec: ModelSpec, *, seed: int,
                         remat: str, teachers: tuple = ()) -> Models:
    """The student and a served or cached teacher (no teacher weights in this process), or a
    :class:`~opd_jax.teacher.router.TeacherRouter` over ``teachers``, checked against the
    student's vocabulary and tokenizer."""
    student = with_execution(derive(load_source(student_spec, seed + 1), student_spec, seed + 1),
                             student_spec)
    tokenizer = student.tokenizer
    if tokenizer is None:
        raise ValueError("the student came with no tokenizer; set student.tokenizer")
    fingerprint = tokenizer_fingerprint(tokenizer)
    if teachers:
        source = TeacherRouter([(t.name or f"teacher{i}", tuple(t.route),
                                 _member(t, student, fingerprint, seed))
                                for i, t in enumerate(teachers)])
    else:
        source = open_teacher_source(teacher_spec.source, vocab_size=student.config.vocab_size,
                                     tokenizer=fingerprint, wait_s=teacher_spec.service_wait_s)
    models = _student_models(student, student_spec, None, tokenizer, seed=seed, remat=remat)
    return dataclasses.replace(models, teacher_source=source)


def _member(spec: ModelSpec, student: Model, fingerprint: str, seed: int):
    """One entry of ``teachers:`` as a teacher source: in-process, served or cached (a cache
    answers for the dataset it was built from: distill stages only)."""
    kind = source_kind(spec.source)
    if kind in ("service", "cache"):
        return open_teacher_source(spec.source, vocab_size=student.config.vocab_size,
                                   tokenizer=fingerprint, wait_s=spec.service_wait_s)
    teacher = load_teacher_model(spec, seed)
    check_same_vocab(teacher, student)
    if teacher.tokenizer is not None and tokenizer_fingerprint(teacher.tokenizer) != fingerprint:
        raise ValueError(f"teachers: {spec.source} has another tokenizer than the student; "
                         "distillation needs one vocabulary (set its tokenizer:)")
    return LocalTeacher(teacher.params, teacher.config)
