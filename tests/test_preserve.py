"""Edit-preserving fine-tuning on tiny models: nullspace keeps W'k exact, anchor with
μ = 0 is plain fine-tuning bit for bit, replay trains the edit prompts, freeze-edited."""

import pytest
import torch

from editdecay import EditdecayError
from editdecay.facts.record import FactRecord
from editdecay.finetune import FinetuneConfig, prepare_model
from editdecay.finetune.data import batch_stream
from editdecay.finetune.preserve import PreserveConfig, edit_keys, make_preserver
from editdecay.finetune.trainer import TrainConfig, train
from editdecay.models.arch import get_arch

from conftest import make_tiny_model
from fakes import word_tokenizer

WORDS = "The capital of France is Paris London Rome Germany Berlin a city in Europe Italy speaks French English".split()
FACTS = [FactRecord("fr", "France", "The capital of {} is", target_new="London", target_true="Paris",
                    paraphrases=("a city in France is",)),
         FactRecord("de", "Germany", "The capital of {} is", target_new="Rome", target_true="Berlin")]
PATTERN = [[(i * 3 + s) % 23 + 2 for i in range(16)] for s in range(64)]
EDITED = [1]
RHO = 0.5



@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def _run(tok, method, preserve=None, model_type="llama", steps=5, policy="all"):
    torch.manual_seed(0)
    model = make_tiny_model(model_type)
    tuned, names, _ = prepare_model(model, FinetuneConfig(method=method, policy=policy, dropout=0.0))
    pres = make_preserver(preserve, tuned, tok, FACTS, EDITED) if preserve is not None else None
    train(tuned, batch_stream(PATTERN, 4), TrainConfig(lr=1e-2, max_steps=steps, eval_every=steps, weight_decay=0.01),
          evaluate=lambda m: {}, progress=False, preserver=pres)
    lm = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    return lm.eval()


def _rewrite_out(model, tok, x=None):
    spec = get_arch(model)
    mod = model.get_submodule(spec.rewrite_module_name(EDITED[0]))
    if x is None:
        x = edit_keys(model, tok, FACTS, EDITED)[EDITED[0]]
    with torch.no_grad():
        return mod(x)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_nullspace_keeps_the_edited_keys_outputs_while_others_change(tok, model_type, method):
    base = make_tiny_model(model_type)
    keys = edit_keys(base, tok, FACTS, EDITED)[EDITED[0]]
    assert keys.shape[0] == 3  # two rewrite prompts and one paraphrase
    probe = torch.randn(5, keys.shape[1], generator=torch.Generator().manual_seed(3))
    v0, o0 = _rewrite_out(base, tok, keys), _rewrite_out(base, tok, probe)
    plain = _run(tok, method, None, model_type, steps=10)
    tuned = _run(tok, method, PreserveConfig("nullspace"), model_type, steps=10)
    assert (_rewrite_out(plain, tok, keys) - v0).abs().max() > 1e-3  # plain fine-tuning moves them
    assert (_rewrite_out(tuned, tok, keys) - v0).abs().max() < 1e-5
    assert (_rewrite_out(tuned, tok, probe) - o0).abs().max() > 1e-3  # the module still trains


@pytest.mark.parametrize("method", ["full", "lora"])
def test_anchor_with_zero_weight_is_plain_fine_tuning_bit_exactly(tok, method):
    plain = _run(tok, method)
    zero = _run(tok, method, PreserveConfig("anchor", mu=0.0))
    for (n, p), q in zip(plain.named_parameters(), zero.parameters()):
        assert torch.equal(p, q), n


def test_anchor_holds_the_edited_outputs_closer_than_plain(tok):
    base = make_tiny_model("llama")
    keys = edit_keys(base, tok, FACTS, EDITED)[EDITED[0]]
    v0 = _rewrite_out(base, tok, keys)
    drift = {mu: float((_rewrite_out(_run(tok, "full", PreserveConfig("anchor", mu=mu), steps=10), tok, keys) - v0).norm())
             for mu in (0.0, 100.0)}
    assert drift[100.0] < 0.5 * drift[0.0]


def test_replay_lowers_the_edit_targets_loss(tok):
    from editdecay.finetune.preserve import Replay

    def target_loss(model):
        r = Replay(model, tok, FACTS, 0.5, 3)
        b = r.next_batch()
        with torch.no_grad():
            return float(model(**b).loss)

    plain = _run(tok, "full", steps=10)
    replay = _run(tok, "full", PreserveConfig("replay", rho=0.5), steps=10)
    assert target_loss(replay) < target_loss(plain) - 0.5


def test_distill_holds_the_edited_models_distributions_on_edit_and_neighbour_prompts(tok):
    from editdecay.evaluate.metrics import split_target
    from editdecay.facts.record import Neighbor
    from editdecay.finetune.preserve import Distill

    facts = [FACTS[0].__class__(**{**FACTS[0].__dict__, "neighborhood": (Neighbor("The capital of Italy is", "Rome"),)}),
             FACTS[1]]
    base = make_tiny_model("llama")
    ref = Distill(base, tok, facts, 0.5, 8)
    p_ids, t_ids = split_target(tok, FACTS[0].text, "London")
    ids, pos, _, _ = ref.edit[0]  # every target token's position, teacher-forced
    assert ids == [*p_ids, *t_ids[:-1]] and pos == list(range(len(p_ids) - 1, len(ids)))
    assert len(ref.edit) == 3 and len(ref.neigh) == 1 and ref.neigh[0][1] == [len(ref.neigh[0][0]) - 1]

    rows = [(r[0], r[1]) for r in ref.edit + ref.neigh]
    start = [lg.log_softmax(-1) for lg in ref._logits(rows)]

    def drift(model):  # mean KL(start || model) over the kept positions
        ref.lm = model
        with torch.no_grad():
            lgs = ref._logits(rows)
        return sum(float(torch.nn.functional.kl_div(lg.log_softmax(-1), s, log_target=True, reduction="sum"))
                   for lg, s in zip(lgs, start)) / sum(len(r[1]) for r in rows)

    def run(preserve):
        torch.manual_seed(0)
        model = make_tiny_model("llama")
        tuned, _, _ = prepare_model(model, FinetuneConfig(method="full", dropout=0.0))
        pres = Distill(tuned, tok, facts, RHO, 8) if preserve else None
        train(tuned, batch_stream(PATTERN, 4), TrainConfig(lr=1e-2, max_steps=10, eval_every=10), evaluate=lambda m: {},
              progress=False, preserver=pres)
        return tuned.eval()

    assert drift(run(True)) < 0.5 * drift(run(False))


def test_freeze_edited_is_the_non_edited_policy(tok, tmp_path):
    from editdecay.finetune.presets import get_preset
    from editdecay.finetune.run import finetune
    from editdecay.finetune.tasks import load_task

    model = make_tiny_model("llama")
    spec = get_arch(model)
    before = {n: p.clone() for n, p in model.named_parameters() if spec.block_of(n) == 1}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The capital of France is Paris a city in Europe " * 4] * 12))
    task = load_task("unstructured", tok, corpus, model=model, n_val=2, block_size=8)
    p = get_preset("cpu-unstructured", method="full", max_steps=3, eval_every=3, stop=[], lr=1e-2)
    res = finetune(model, tok, task, p, edited=[1], preserve=PreserveConfig("freeze-edited"), progress=False)
    assert res.blocks == [0, 2] and res.to_json()["preserve"]["method"] == "freeze-edited"
    for n, q in res.lm.named_parameters():
        if n in before:
            assert torch.equal(q, before[n]), n
    with pytest.raises(EditdecayError, match="cannot combine"):
        finetune(model, tok, task, p, policy="edited", edited=[1], preserve=PreserveConfig("freeze-edited"), progress=False)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(EditdecayError, match="unknown preserve method 'pin'"):
        PreserveConfig("pin")
    with pytest.raises(EditdecayError, match="rho"):
        PreserveConfig("replay", rho=1.0)
    with pytest.raises(EditdecayError, match="needs the edited facts"):
        make_preserver(PreserveConfig("anchor"), make_tiny_model("llama"), None, [], [1])
