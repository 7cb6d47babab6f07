"""Process groups the memory needs beyond megatron-core's: the bank group (:mod:`~moc_megatron.parallel.bank_group`)."""
