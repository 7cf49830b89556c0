"""Decoding stopped from outside and started from the previous call's KV cache: the engine's completions with a kept
cache are token for token a cold start's, and only the tokens after the shared prefix are fed to the model (GPT-2
and Llama, greedy and speculative, drafted by a model or by prompt lookup); a set ``cancel`` stops greedy, beam,
sampling and speculative decoding before their next model pass. Forward passes and the tokens fed are counted with
hooks, never timed."""

from __future__ import annotations

import threading

import pytest
from conftest import make_fim_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_models import tiny_llama

from kdcode.inference.engine import Engine, load_engine
from kdcode.inference.forward import PromptCache
from kdcode.inference.lookup import as_lookup

BASE = (
    "import os\n\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    if not path:\n"
    "        return None\n    for name in os.listdir(path):\n        print(name)\n"
)
# an editor's requests: the last line edited, a line typed after it, another file, back to the first
EDITS = [BASE + "    return pa", BASE + "    return os.pa", BASE + "    return os.path\n    x = ", "x = 1\n", BASE]


class Fed:
    """Counts a model's forward passes and the tokens fed to each; sets ``cancel`` as pass ``cancel_at`` begins."""

    def __init__(self, model, cancel: threading.Event | None = None, cancel_at: int = 0) -> None:
        self.tokens: list[int] = []
        self.cancel, self.cancel_at = cancel, cancel_at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, _module, args) -> None:
        self.tokens.append(int(args[0].shape[1]))
        if self.cancel is not None and len(self.tokens) == self.cancel_at:
            self.cancel.set()

    def take(self) -> list[int]:
        out, self.tokens = self.tokens, []
        return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "llama", tokenizer)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, teacher_dir):
    return make_fim_model(tmp_path_factory.mktemp("draft"), teacher_dir, seed=1, n_layer=2)


@pytest.fixture(scope="module", params=["gpt2", "llama", "draft", "lookup"])
def engine(request, teacher_dir, llama_dir, draft_dir, fim_teacher_dir) -> Engine:
    if request.param == "gpt2":
        return load_engine(str(teacher_dir), device="cpu", warm_up=False)
    if request.param == "llama":
        return load_engine(str(llama_dir), device="cpu", warm_up=False)
    if request.param == "lookup":  # prompt lookup drafting: the target's cache alone
        return load_engine(str(llama_dir), device="cpu", warm_up=False, draft="lookup", draft_tokens=3)
    return load_engine(str(fim_teacher_dir), device="cpu", warm_up=False, draft=str(draft_dir), draft_tokens=3)


def _models(engine: Engine) -> list:
    """Each model of the engine and the cache it keeps."""
    pairs = [(engine.model, engine.prompt_cache)]
    drafted = engine.draft is not None and as_lookup(engine.draft) is None  # prompt lookup has no model
    return pairs + ([(engine.draft.model, engine.draft_cache)] if drafted else [])


def test_a_kept_cache_gives_a_cold_starts_tokens_and_feeds_only_what_changed(engine):
    """Each of an editor's requests, from the cache the one before left: the tokens of a cold start, and each model
    fed exactly the cold start's tokens less those its cache held."""
    counters = [(Fed(model), kept) for model, kept in _models(engine)]
    try:
        cold, cold_fed = [], []
        for prompt in EDITS:  # each from nothing
            engine.clear_prompt_cache()
            cold.append(engine.complete(prompt, 12, stop=[]))
            cold_fed.append([sum(fed.take()) for fed, _ in counters])
        engine.clear_prompt_cache()
        for i, prompt in enumerate(EDITS):
            warm = engine.complete(prompt, 12, stop=[])
            assert warm.choices == cold[i].choices, prompt
            assert warm.cached_tokens == engine.prompt_cache.reused
            for (fed, kept), fed_cold in zip(counters, cold_fed[i]):
                assert sum(fed.take()) == fed_cold - kept.reused
                if i == 0:
                    assert kept.reused == 0
                if i in (1, 2):  # the same start as the request before: only what follows it is fed
                    assert kept.reused >= engine.count_tokens(BASE) - 2, (i, kept.reused)
                if i in (3, 4):  # another text than the last: nothing shared (or next to nothing)
                    assert kept.reused <= 1
    finally:
        for fed, _ in counters:
            fed.handle.remove()


def test_the_prefill_feeds_the_prompt_less_its_cached_tokens(teacher_dir):
    """Greedy, counted exactly: the second request re-feeds from the first token they do not share (the prompt's last
    token at least), so the model sees exactly prompt - cached tokens."""
    engine = load_engine(str(teacher_dir), device="cpu", warm_up=False)
    fed = Fed(engine.model)
    try:
        first = engine.complete(EDITS[0], 4, stop=[])
        assert fed.take()[0] == engine.count_tokens(EDITS[0]) - 1  # healed: the last token is generated
        again = engine.complete(EDITS[0], 4, stop=[])
        assert fed.take() == [1] * again.choices[0].tokens  # all but the last prompt token came from the cache
        assert again.cached_tokens == engine.count_tokens(EDITS[0]) - 2 and again.choices == first.choices
        # beam search starts cold and leaves the kept cache as it was
        engine.complete(EDITS[1], 4, n=2)
        assert fed.take()[0] == engine.count_tokens(EDITS[1]) - 1
        engine.complete(EDITS[0], 4, stop=[])
        assert fed.take()[0] == 1
    finally:
        fed.handle.remove()


def test_prompt_cache_keeps_only_what_it_can_cut_back():
    class Sliding:
        is_croppable, is_sliding = True, [True]

        def get_seq_length(self) -> int:
            return 3

    kept = PromptCache()
    kept.keep(Sliding(), [1, 2, 3])
    assert kept.cache is None and kept.take([1, 2, 3, 4], 3) == (None, 0)
    kept.keep(None, [1])
    assert kept.cache is None


@pytest.mark.parametrize("how", ["greedy", "beams", "sampled", "draft", "lookup"])
def test_cancel_stops_decoding_before_the_next_model_pass(teacher_dir, draft_dir, fim_teacher_dir, how):
    """``cancel`` set while pass 3 runs: it is the last pass, of the target and of the draft."""
    if how == "draft":
        engine = load_engine(str(fim_teacher_dir), device="cpu", warm_up=False, draft=str(draft_dir), draft_tokens=2)
    elif how == "lookup":
        engine = load_engine(str(teacher_dir), device="cpu", warm_up=False, draft="lookup", draft_tokens=2)
    else:
        engine = load_engine(str(teacher_dir), device="cpu", warm_up=False)
    cancel = threading.Event()
    target = Fed(engine.model, cancel, cancel_at=3)
    draft = Fed(engine.draft.model) if how == "draft" else None
    kw = {"n": 2} if how == "beams" else {"n": 2, "temperature": 0.8, "seed": 1} if how == "sampled" else {}
    result = engine.complete(BASE, 60, stop=[], cancel=cancel, **kw)
    assert result.cancelled and len(target.tokens) == 3
    if draft is not None:
        drafted = len(draft.tokens)
        assert drafted <= 3 * 2 + 1  # the draft's passes in the target's first 3 passes, none after
    assert all(c.tokens < 60 for c in result.choices)
    after = engine.complete(BASE, 2, stop=[])  # the engine is not left half-way: the next call is whole
    assert not after.cancelled and after.choices[0].text == engine.complete(BASE, 2, stop=[]).choices[0].text
    target.handle.remove()
    if draft is not None:
        draft.handle.remove()


@pytest.fixture(scope="module")
def gpt2(teacher_dir) -> Engine:
    return load_engine(str(teacher_dir), device="cpu", warm_up=False)


edits = st.lists(st.tuples(st.integers(0, len(BASE)), st.text(alphabet="ab (:)\n    x=.", max_size=12)),
                 min_size=2, max_size=4)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits)
def test_any_sequence_of_edits_completes_as_cold_starts_do(gpt2, edits):
    """An editor's requests at random cursors with random typing: each answer from the kept cache is the cold one."""
    prompts = [BASE[:cut] + typed for cut, typed in edits]
    warm = [gpt2.complete(p, 6, stop=[]).choices for p in prompts]
    cold = []
    for p in prompts:
        gpt2.clear_prompt_cache()
        cold.append(gpt2.complete(p, 6, stop=[]).choices)
    assert warm == cold
