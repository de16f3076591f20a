//! Account-data writes made the way Synapse makes them (for `demo` and the tests): the stream id
//! is taken from `account_data_sequence` in its own statement first, then an
//! `INSERT … ON CONFLICT … DO UPDATE` upsert; tags change `room_tags` and bump
//! `room_tags_revisions` (UPDATE, else INSERT) in one transaction; MSC3391 deletion UPDATEs an
//! existing row to `{}`. (Checked against Synapse 1.163 by `tests/integration/real_synapse.rs`.)

use tokio_postgres::Client;

async fn next_stream_id(c: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one("SELECT nextval('account_data_sequence')", &[])
        .await?
        .get(0))
}

/// `PUT /user/{user}/account_data/{type}` (content as compact JSON text).
pub async fn set_global(c: &Client, user: &str, data_type: &str, content: &str) -> Result<(), tokio_postgres::Error> {
    let id = next_stream_id(c).await?;
    c.execute(
        "INSERT INTO account_data (user_id, account_data_type, stream_id, content) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, account_data_type) DO UPDATE SET stream_id = EXCLUDED.stream_id, content = EXCLUDED.content",
        &[&user, &data_type, &id, &content],
    )
    .await?;
    Ok(())
}

/// `DELETE /user/{user}/account_data/{type}` (MSC3391): the row stays with content `{}`.
pub async fn delete_global(c: &Client, user: &str, data_type: &str) -> Result<(), tokio_postgres::Error> {
    // As Synapse does it: only an existing, not yet deleted row changes.
    let id = next_stream_id(c).await?;
    c.execute(
        "UPDATE account_data SET stream_id = $3, content = '{}' \
         WHERE user_id = $1 AND account_data_type = $2 AND content != '{}'",
        &[&user, &data_type, &id],
    )
    .await?;
    Ok(())
}

/// `PUT /user/{user}/rooms/{room}/account_data/{type}`.
pub async fn set_room(
    c: &Client,
    user: &str,
    room: &str,
    data_type: &str,
    content: &str,
) -> Result<(), tokio_postgres::Error> {
    let id = next_stream_id(c).await?;
    c.execute(
        "INSERT INTO room_account_data (user_id, room_id, account_data_type, stream_id, content) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (user_id, room_id, account_data_type) DO UPDATE SET stream_id = EXCLUDED.stream_id, content = EXCLUDED.content",
        &[&user, &room, &data_type, &id, &content],
    )
    .await?;
    Ok(())
}

async fn bump_tag_revision(c: &Client, user: &str, room: &str, id: i64) -> Result<(), tokio_postgres::Error> {
    // As Synapse does it: UPDATE, and INSERT only when there was no row (no upsert).
    let updated = c
        .execute(
            "UPDATE room_tags_revisions SET stream_id = $3 WHERE user_id = $1 AND room_id = $2",
            &[&user, &room, &id],
        )
        .await?;
    if updated == 0 {
        // (Synapse retries the transaction when two writers race here; the tests' writers may
        // share rooms, so fall back to the UPDATE instead.)
        let inserted = c
            .execute(
                "INSERT INTO room_tags_revisions (user_id, room_id, stream_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&user, &room, &id],
            )
            .await?;
        if inserted == 0 {
            c.execute(
                "UPDATE room_tags_revisions SET stream_id = $3 WHERE user_id = $1 AND room_id = $2",
                &[&user, &room, &id],
            )
            .await?;
        }
    }
    Ok(())
}

/// `PUT /user/{user}/rooms/{room}/tags/{tag}`.
pub async fn add_tag(
    c: &Client,
    user: &str,
    room: &str,
    tag: &str,
    content: &str,
) -> Result<(), tokio_postgres::Error> {
    let id = next_stream_id(c).await?;
    c.batch_execute("BEGIN").await?;
    let r = async {
        c.execute(
            "INSERT INTO room_tags (user_id, room_id, tag, content) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id, room_id, tag) DO UPDATE SET content = EXCLUDED.content",
            &[&user, &room, &tag, &content],
        )
        .await?;
        bump_tag_revision(c, user, room, id).await
    }
    .await;
    c.batch_execute(if r.is_ok() { "COMMIT" } else { "ROLLBACK" }).await?;
    r
}

/// `DELETE /user/{user}/rooms/{room}/tags/{tag}`.
pub async fn remove_tag(c: &Client, user: &str, room: &str, tag: &str) -> Result<(), tokio_postgres::Error> {
    let id = next_stream_id(c).await?;
    c.batch_execute("BEGIN").await?;
    let r = async {
        c.execute(
            "DELETE FROM room_tags WHERE user_id = $1 AND room_id = $2 AND tag = $3",
            &[&user, &room, &tag],
        )
        .await?;
        bump_tag_revision(c, user, room, id).await
    }
    .await;
    c.batch_execute(if r.is_ok() { "COMMIT" } else { "ROLLBACK" }).await?;
    r
}
