"""The `ragindex` command line: an edge beside the flows that parses options and calls flows and steps."""
