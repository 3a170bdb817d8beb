"""Ray Data jobs that turn raw image-text data into Arrow training shards."""
