"""Fine-tune: heal a compressed conversion by distillation from its source.

Takes the converted model as written, the source and the staged training text; gives trained weights
(folded back into the stored layout), a report section, and resumable checkpoints under
MODEL_OUT/.finetune/. Open `finetune.py` (the stage) first, then `distill.py` (the loop).
"""
