//! `corral-server --db postgres://...` against a real PostgreSQL (Debian's `postgresql`, a
//! throwaway cluster each test starts): the same behaviour suite the SQLite store passes
//! (`server/src/store/conformance.rs`), what survives a reconnect and a PostgreSQL restart,
//! migrations run by replicas starting together, and one revision sequence when replicas
//! commit at once.

use std::sync::Arc;

use anyhow::{Context as _, ensure};
use corral_server::store::{
    Change, PolicyStore, StoreError, conformance,
    grants::{GrantFilter, GrantStore as _},
    postgres::PgStore,
};
use corral_tests::postgres::Postgres;

fn cluster(name: &str) -> anyhow::Result<Option<Postgres>> {
    if !corral_tests::privileged() {
        return Ok(None);
    }
    Postgres::start(name).map(Some)
}

#[tokio::test]
async fn the_store_behaves_as_sqlite_does_and_survives_reconnect() -> anyhow::Result<()> {
    let Some(pg) = cluster("conformance")? else {
        return Ok(());
    };
    let (a, b) = {
        let s = PgStore::connect(&pg.url()).await?;
        conformance::policies(&s).await?;
        conformance::grants(&s).await?;
        conformance::events(&s).await?;
        conformance::nodes(&s).await?;
        let all = s.list(&GrantFilter::default()).await?;
        (all[0].id, all[1].id)
    };
    // Another connection (another replica, or this one restarted) reads the same state.
    let s = PgStore::connect(&pg.url()).await?;
    conformance::policies_after_three(&s).await?;
    let all = s.list(&GrantFilter::default()).await?;
    ensure!(
        all.len() == 3 && (all[0].id, all[1].id) == (a, b),
        "{all:?}"
    );
    ensure!(
        pg.sql("SELECT string_agg(version::text, ',' ORDER BY version) FROM corral_schema")?
            == "1,2"
    );
    Ok(())
}

#[tokio::test]
async fn replicas_starting_together_migrate_once() -> anyhow::Result<()> {
    let Some(pg) = cluster("migrate")? else {
        return Ok(());
    };
    let url = pg.url();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url).await })
        })
        .collect();
    for s in starts {
        s.await?.context("a replica could not start")?;
    }
    ensure!(pg.sql("SELECT count(*) FROM corral_schema")? == "2");
    ensure!(pg.sql("SELECT count(*) FROM revisions")? == "0");
    // A schema newer than this server knows is refused, not written into.
    pg.sql("INSERT INTO corral_schema VALUES (99, 0)")?;
    match PgStore::connect(&url).await {
        Err(StoreError::SchemaTooNew { have: 99, known: 2 }) => Ok(()),
        Err(e) => anyhow::bail!("unexpected error: {e}"),
        Ok(_) => anyhow::bail!("a newer schema was accepted"),
    }
}

/// Commits on `s` until it has made `n`, each on the revision it last read (a conflict means
/// another replica committed first: read again).
async fn commit_n(s: Arc<PgStore>, who: &'static str, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut made = Vec::new();
    while made.len() < n {
        let base = s.current().await?.revision;
        let change = Change {
            applied_by: who.into(),
            upserts: vec![(format!("{who}-{}", made.len()), format!("v{base}"))],
            deletes: Vec::new(),
        };
        match s.commit(base, &change).await {
            Ok(r) => made.push(r),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_committing_at_once_make_one_sequence() -> anyhow::Result<()> {
    let Some(pg) = cluster("sequence")? else {
        return Ok(());
    };
    let a = Arc::new(PgStore::connect(&pg.url()).await?);
    let b = Arc::new(PgStore::connect(&pg.url()).await?);
    let ta = tokio::spawn(commit_n(a.clone(), "a", 40));
    let tb = tokio::spawn(commit_n(b.clone(), "b", 40));
    let mut all = ta.await??;
    all.extend(tb.await??);
    all.sort_unstable();
    ensure!(
        all == (1..=80).collect::<Vec<u64>>(),
        "no revision skipped or made twice: {all:?}"
    );
    ensure!(a.current().await? == b.current().await?);
    ensure!(a.current().await?.policies.len() == 80);
    Ok(())
}

#[tokio::test]
async fn a_postgres_restart_loses_nothing_and_the_sequence_goes_on() -> anyhow::Result<()> {
    let Some(mut pg) = cluster("restart")? else {
        return Ok(());
    };
    let s = PgStore::connect(&pg.url()).await?;
    let change = |n: &str| Change {
        applied_by: "t".into(),
        upserts: vec![(n.into(), "y".into())],
        deletes: Vec::new(),
    };
    ensure!(s.commit(0, &change("one")).await? == 1);
    ensure!(s.commit(1, &change("two")).await? == 2);
    pg.restart()?;
    // The pool's connections died with the server: the first call after may fail (it says
    // so), and the store reconnects for the next.
    let mut now = None;
    for _ in 0..50 {
        match s.current().await {
            Ok(c) => {
                now = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let now = now.context("the store did not reconnect after the restart")?;
    ensure!(now.revision == 2 && now.policies.len() == 2, "{now:?}");
    ensure!(s.commit(2, &change("three")).await? == 3);
    ensure!(
        pg.sql("SELECT string_agg(revision::text, ',' ORDER BY revision) FROM revisions")?
            == "1,2,3"
    );
    Ok(())
}
