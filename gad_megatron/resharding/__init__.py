"""Actor -> rollout-engine weight sync: the plan (plan.py), its execution (execute.py) and
the transports that carry buckets (transport.py). See docs/weight_sync.md."""
