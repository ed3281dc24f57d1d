"""Cost estimation: price books with a source and date on every row (pricing), workloads typed
or measured from a VM or a backup chain (model, measure, policy), month-by-month estimates
(model), comparisons and charts (compare).

No Prefect here (flows/cost.py publishes the results); docs/cost.md explains the model.
Nothing is imported at package level: ``hyperctl`` checks its input before pandas loads.
"""
