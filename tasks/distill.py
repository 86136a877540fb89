"""Prefect task for DPKD: a student (every other teacher layer, a public pretrained model, or random) trained with
DP on the private data, with KD from the DP teacher's soft labels (post-processing of a DP model: no privacy cost)."""
from __future__ import annotations

from prefect import task

from compression.data import load_encoded
from compression.distill import StudentConfig, distillation_loss, make_student
from compression.losses import KDConfig
from compression.models import load_saved, model_fingerprint
from compression.train import TrainConfig
from privacy.config import StageBudget
from tasks.caching import FOLDER_CACHED, stage_dir
from tasks.refs import DataRef, ModelRef, RunContext
from tasks.stage import reuse, run_dp_stage


@task(name="distill", **FOLDER_CACHED)
def distill(*, stage: str, budget: StageBudget, teacher: ModelRef, ledger_from: ModelRef, data: DataRef,
            student: StudentConfig, method, train: TrainConfig, kd: KDConfig, base_model: str, output_dir: str,
            context: RunContext) -> ModelRef:
    """DPKD: the student `student.init` trained with DP on (1 - w) CE + w T^2 KL to the DP teacher."""
    public = model_fingerprint(student.pretrained or base_model) if student.init == "pretrained" else ""
    out = stage_dir(output_dir, stage, {"teacher": teacher, "ledger_from": ledger_from, "student": student,
                                        "method": method, "train": train, "kd": kd, "budget": budget,
                                        "base": base_model, "pretrained_content": public})
    if done := reuse(out, stage, context):
        return done
    net, tokenizer = load_saved(teacher.path)
    model = make_student(net, student, base=base_model, seed=train.seed,
                         teacher_vocab=tokenizer.get_vocab() if tokenizer is not None else None)
    return run_dp_stage(name=stage, budget=budget, model=model, tokenizer=tokenizer, data=data, train=train,
                        method=method, out=out, ledger_from=ledger_from, context=context,
                        loss_fn=distillation_loss(net, load_encoded(data.train_file), kd),
                        params={"student": vars(student), "kd": vars(kd), "student_layers": model.num_layers})
