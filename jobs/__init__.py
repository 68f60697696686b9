"""Ray jobs / Ray Data pipelines (activation caching, transcoder training), submitted with `ray job submit`."""
