"""Teacher-assistant chains (TAKD): teacher -> assistant(s) -> student in one command.

Mirzadeh, Farajtabar, Li, Levine, Matsukawa, Ghasemzadeh, "Improved Knowledge Distillation via
Teacher Assistant", AAAI 2020, arXiv:1902.03393. ``--assistants=resnet20,resnet14`` distils the
teacher into the first assistant, that one into the next, ..., the last into ``--arch``, each link
with ``--method`` (any offline method; ST by default) and the run's other settings.

Layout: the teacher in ``TRAIN_DIR/teacher`` (unless ``--teacher_ckpt``), assistant k in
``TRAIN_DIR/assistant<k>_<arch>``, the student in ``TRAIN_DIR/student_<arch>``. Each link is an
ordinary run (``engine.train``) whose teacher is the previous link's train dir: a rerun of the
command reuses finished links and resumes the unfinished one from its checkpoint.
"""
import os

from kd_tf2.engine import config as cfg


def links(config):
  """The chain's runs, in order: ``[(name, TrainConfig)]``, the last one the student's (in
  ``TRAIN_DIR/student_<arch>``). ``config`` is validated and has ``assistants``."""
  archs = config.assistants.split(",")
  teacher_dir = config.teacher_ckpt or os.path.join(config.train_dir, "teacher")
  out, previous, teacher_arch = [], teacher_dir, config.teacher_arch
  for k, arch in enumerate(archs, start=1):
    link_dir = os.path.join(config.train_dir, f"assistant{k}_{arch}")
    out.append((f"assistant{k}", config.replace(arch=arch, teacher_arch=teacher_arch,
                                                teacher_ckpt=previous, assistants="",
                                                train_dir=link_dir)))
    previous, teacher_arch = link_dir, arch
  out.append(("student", config.replace(
      teacher_arch=teacher_arch, teacher_ckpt=previous, assistants="",
      train_dir=os.path.join(config.train_dir, f"student_{config.arch}"))))
  return out


def train_chain(config, train, flags=None):
  """Train (or reuse, or resume) every link of ``config``'s chain with ``train(config, flags)``;
  returns the student's results plus ``teacher_top1`` and ``assistant<k>_top1``."""
  config = cfg.validate(config)
  summary = {}
  if not config.teacher_ckpt:
    teacher = cfg.teacher_config(config)
    summary["teacher_top1"] = train(teacher, flags=dict(vars(teacher)))["top1"]
  for name, link in links(config):
    link_flags = dict(vars(link), chain=config.assistants) if flags is not None else None
    results = train(link, flags=link_flags)
    if name != "student":
      summary[f"{name}_top1"] = results["top1"]
  return {**results, **summary, "assistants": config.assistants}
