import pytest
import torch

from compression.distill import STUDENT_INITS, StudentConfig, every_other_layer, make_student, random_init
from compression.models import build_tiny, save_classifier


def test_every_other_layer_copies_layers_embeddings_and_head():
    teacher = build_tiny(num_layers=4, seed=0)
    student = every_other_layer(teacher)
    assert student.num_layers == 2
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    for s_index, t_index in enumerate((0, 2)):
        for key in ("attention.self.query.weight", "output.dense.weight"):
            assert torch.equal(s_params[f"encoder.encoder.layer.{s_index}.{key}"],
                               t_params[f"encoder.encoder.layer.{t_index}.{key}"])
    assert torch.equal(s_params["head.weight"], t_params["head.weight"])
    assert torch.equal(s_params["encoder.embeddings.word_embeddings.weight"],
                       t_params["encoder.embeddings.word_embeddings.weight"])
    assert teacher.num_layers == 4  # the teacher is untouched
    ids = torch.randint(5, 100, (2, 7))
    assert student(ids, torch.ones_like(ids), torch.zeros_like(ids)).shape == (2, 2)


def test_registry_and_validation():
    teacher = build_tiny(num_layers=4, seed=0)
    assert make_student(teacher, StudentConfig(layer_map=(1, 3))).num_layers == 2
    rand = random_init(teacher)
    assert not torch.equal(rand.layers[0].output.dense.weight, teacher.layers[0].output.dense.weight)
    with pytest.raises(ValueError, match="init must be one of"):
        StudentConfig(init="nope")
    with pytest.raises(ValueError, match="entries must lie in 0..3"):
        every_other_layer(teacher, StudentConfig(layer_map=(0, 9)))


def test_random_student_is_drawn_from_its_seed_not_the_global_state():
    """A line's rerun (or its run on a Dask worker) must start from the same random student: the seed decides the
    encoder and the head, whatever the process's global random state, and the global state is left alone."""
    teacher = build_tiny(num_layers=4, seed=0)
    torch.manual_seed(1)
    first = random_init(teacher, seed=7)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)  # random_init drew nothing from the global generator
    torch.manual_seed(2)
    second = make_student(teacher, StudentConfig(init="random"), seed=7)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = random_init(teacher, seed=8)
    assert not torch.equal(other.head.weight, first.head.weight)
    assert not torch.equal(other.layers[0].output.dense.weight, first.layers[0].output.dense.weight)


def test_pretrained_student_loads_public_weights_with_a_fresh_head(tmp_path):
    """init 'pretrained': the public model's weights (not the DP teacher's), a fresh head, layer_map kept."""
    public = build_tiny(num_layers=4, seed=1)
    save_classifier(public, None, tmp_path / "public")
    (tmp_path / "public" / "classifier.json").unlink()  # a plain HF encoder folder, as on the hub
    teacher = build_tiny(num_layers=4, seed=0)
    student = make_student(teacher, StudentConfig(init="pretrained", layer_map=(1, 3)), base=str(tmp_path / "public"))
    assert student.num_layers == 2 and student.pooling == teacher.pooling
    torch.testing.assert_close(student.layers[1].output.dense.weight, public.layers[3].output.dense.weight)
    assert not torch.equal(student.layers[1].output.dense.weight, teacher.layers[3].output.dense.weight)
    full = make_student(teacher, StudentConfig(init="pretrained", pretrained=str(tmp_path / "public")))
    assert full.num_layers == 4  # an explicit public student keeps all its layers
    compact = make_student(teacher, StudentConfig(init="pretrained"), base=str(tmp_path / "public"))
    assert compact.num_layers == 2  # the teacher's base, cut to every other layer


@pytest.mark.parametrize("init", sorted(STUDENT_INITS))
def test_every_student_init_takes_what_the_distill_task_passes(tmp_path, init):
    """tasks/distill.py passes base, teacher_vocab and seed to whichever init the config names; the seed alone decides
    a fresh head (or encoder), and the caller's global generator is left alone."""
    save_classifier(build_tiny(num_layers=4, seed=1), None, tmp_path / "public")
    (tmp_path / "public" / "classifier.json").unlink()
    teacher = build_tiny(num_layers=4, seed=0)
    context = {"base": str(tmp_path / "public"), "teacher_vocab": None}
    torch.manual_seed(1)
    first = make_student(teacher, StudentConfig(init=init), seed=3, **context)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)
    again = make_student(teacher, StudentConfig(init=init), seed=3, **context)
    other = make_student(teacher, StudentConfig(init=init), seed=4, **context)
    assert torch.equal(first.head.weight, again.head.weight)
    assert torch.equal(first.head.weight, other.head.weight) == (init == "every_other")  # the teacher's head


def test_pretrained_student_needs_the_teachers_vocabulary(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    save_classifier(build_tiny(num_layers=2, seed=1), BertTokenizerFast(vocab_file=str(vocab)), tmp_path / "public")
    (tmp_path / "public" / "classifier.json").unlink()
    (tmp_path / "public" / "head.pt").unlink()
    teacher = build_tiny(num_layers=2, seed=0)
    with pytest.raises(ValueError, match="tokenizer differs from the teacher"):
        make_student(teacher, StudentConfig(init="pretrained", pretrained=str(tmp_path / "public")),
                     teacher_vocab={"[PAD]": 0, "x": 1})
    with pytest.raises(ValueError, match="needs a model name or path"):
        make_student(teacher, StudentConfig(init="pretrained"))
