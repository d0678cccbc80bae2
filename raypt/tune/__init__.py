"""`raypt tune`: sweeps over any job key, where every trial is a distributed, fault-tolerant raypt run.

  sweep    the sweep file (base job, search space, metric, scheduler) and the check of every trial's job
  trial    one trial: the driver's start, build and finish steps under the sweep folder
  run      concurrency from the cluster, Tune's scheduler, progress lines, resuming a sweep
  results  results.csv / .md, curves.png and best.yaml from the trials' run folders
"""
