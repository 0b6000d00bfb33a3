"""The distill stage: on-policy distillation of the merged student from each domain's branch
(sample -> score -> advantage -> policy-gradient update, in rounds; see stage.py)."""
