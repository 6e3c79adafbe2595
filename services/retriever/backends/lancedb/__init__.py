"""The embedded default backend: LanceDB on disk (`store.LanceDBStore`), its queries (`search`, `vector`),
filters as SQL (`sql`), and index maintenance (`index`, with one job per child process in `builder`)."""
