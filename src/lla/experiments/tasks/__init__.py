"""Experiment tasks: ``ttr`` (test-time regression), ``icr`` (in-context regression), ``mqar``
(multi-query associative recall), ``state`` (group word problems)."""
