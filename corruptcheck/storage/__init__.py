"""Storage: the files the tool reads and writes (goldens, dumps, SGLang dumper files, shards, batch layouts), atomically and strictly."""
