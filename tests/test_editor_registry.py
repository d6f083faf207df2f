"""The editor registry: built-in entries, errors that say how to add one, and a toy
editor defined in this one file that get_editor and the study spec then accept."""

from dataclasses import dataclass, field

import pytest

from editdecay import EditdecayError
from editdecay.editing import EDITOR_REGISTRY, EDITORS, get_editor, register_editor
from editdecay.editing.base import EditResult


@dataclass
class ToyHyperParams:
    scale: float = field(default=1.0, metadata={"help": "How hard the toy pushes."})
    layers: list[int] = field(default_factory=lambda: [0], metadata={"help": "Blocks."})
    seed: int = field(default=0, metadata={"help": "Seed."})


class ToyEditor:
    name = "toy"

    def __init__(self, hparams=None):
        self.hparams = hparams or ToyHyperParams()

    def edit(self, model, tokenizer, requests, *, steps_factor=1):
        return EditResult("toy", [r.case_id for r in requests], {}, {}, 0.0)


@pytest.fixture
def toy():
    register_editor("toy", cls=ToyEditor, hparams=ToyHyperParams)
    yield
    EDITOR_REGISTRY.unregister("toy")


def test_builtin_editors_are_registered_with_their_hparams():
    from editdecay.editing import FTHyperParams, MENDHyperParams, ROMEHyperParams

    assert sorted(EDITORS) == ["alphaedit", "ft", "malmen", "memit", "mend", "rome"]
    assert EDITOR_REGISTRY["ft"].hparams is FTHyperParams and EDITOR_REGISTRY["rome"].hparams is ROMEHyperParams
    assert EDITOR_REGISTRY["mend"].hparams is MENDHyperParams and EDITOR_REGISTRY["mend"].checkpoint
    assert not EDITOR_REGISTRY["rome"].checkpoint


def test_unknown_and_invalid_registrations_say_what_to_do():
    with pytest.raises(EditdecayError, match=r"unknown editing method 'bogus'.*register_editor"):
        get_editor("bogus")
    with pytest.raises(ValueError, match="already registered"):
        register_editor("rome", cls=ToyEditor, hparams=ToyHyperParams)
    with pytest.raises(TypeError, match="dataclass"):
        register_editor("toy2", cls=ToyEditor, hparams=dict)
    with pytest.raises(TypeError, match="no edit"):
        register_editor("toy2", cls=object, hparams=ToyHyperParams)
    with pytest.raises(EditdecayError, match="checkpoint applies to malmen and mend only"):
        get_editor("rome", checkpoint="x")


def test_a_toy_editor_in_one_file_works_everywhere(toy, tmp_path):
    ed = get_editor("toy", overrides={"scale": 2.0})
    assert isinstance(ed, ToyEditor) and ed.hparams.scale == 2.0 and ed.preset_info == {"preset": "default"}
    assert "toy" in EDITORS
    with pytest.raises(EditdecayError, match="unknown field.*scal"):
        get_editor("toy", overrides={"scal": 1})
    # the study spec takes the toy's hyperparameter class from the registry
    from editdecay.study.spec import SpecError, StudySpec, expand

    spec = {"name": "toy", "axes": {"model": "m", "dataset": "builtin", "editor": ["none", "toy"], "n_edits": 2,
                                    "protocol": "batch", "task": "unstructured", "ft_method": "none", "seed": 0},
            "editors": {"toy": {"hparams": {"scale": 3}}}}
    import yaml

    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    trials = expand(StudySpec.from_yaml(path))
    edit = [t.config["edit"] for t in trials if t.config["edit"]]
    assert edit and edit[0]["editor"] == "toy" and edit[0]["hparams"]["scale"] == 3.0
    spec["editors"]["toy"]["hparams"] = {"scale": 3, "nope": 1}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="nope"):
        StudySpec.from_yaml(path)
