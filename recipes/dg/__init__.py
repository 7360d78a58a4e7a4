"""Domain generalization of ViT adapters with DomainBed's protocol: ``accelerate launch -m recipes.dg``.

``train`` (arguments, defaults, ``main``), ``sweep`` (the leave-one-domain-out run loop), ``methods`` (GNN-MoE,
LoRA, LoKr, probe, full), ``data`` (data sets, domains, splits), ``batches`` (step-seeded batches and augmentation),
``report`` (table and plots), ``embedded_digits`` (the offline benchmark) and ``pretrain_backbone`` (its backbone).
"""
