"""What prunes: the groups and their gates, Hessian-aware saliency, the latency regularizer and the knapsack,
the schedule, the limits a latency table sets, the loop with its measured targets and resumable run state."""
