//! Registrations: one key per instance, bound to the client's lease. Core's
//! [`Keeper`](waypost_core::backend::Keeper) owns everything else of a registration's life.

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use waypost_core::backend::{Presence, RegistryStore};
use waypost_core::{Error, Instance, Result};

use crate::client::Conn;
use crate::codec;

/// How many registrations one transaction reads back.
const INSPECT_BATCH: usize = 64;

/// Writes, inspects and deletes instance keys.
#[derive(Clone, Debug)]
pub(crate) struct KeyStore {
    conn: Conn,
}

/// Who holds a key that already exists.
struct Held {
    lease: i64,
    mod_revision: i64,
}

impl KeyStore {
    pub(crate) fn new(conn: Conn) -> Self {
        Self { conn }
    }

    fn key(&self, instance: &Instance) -> String {
        codec::key(
            self.conn.config.layout,
            self.conn.config.key_prefix(),
            instance,
        )
    }

    /// Creates `key` under `lease` if it does not exist (`create_revision == 0`); else
    /// says who holds it. `None` inside: it went between the compare and the read.
    async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<Option<Option<Held>>> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.conn.txn("creating a registration", txn).await?;
        if resp.succeeded() {
            return Ok(None);
        }
        Ok(Some(resp.op_responses().into_iter().find_map(
            |op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| Held {
                    lease: kv.lease(),
                    mod_revision: kv.mod_revision(),
                }),
                _ => None,
            },
        )))
    }

    /// Writes `value` under `lease` if the key is still at `mod_revision`.
    async fn replace(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        mod_revision: i64,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        Ok(self
            .conn
            .txn("replacing a registration", txn)
            .await?
            .succeeded())
    }
}

#[async_trait]
impl RegistryStore for KeyStore {
    type Handle = i64;

    async fn write(&self, lease: &i64, instance: &Instance, takeover: bool) -> Result<()> {
        let lease = *lease;
        let key = self.key(instance);
        let value = codec::encode(self.conn.config.layout, instance);
        // A key that changes between our compare and our write is tried again, twice.
        for _ in 0..3 {
            match self.create(&key, &value, lease).await? {
                None => return Ok(()),
                Some(None) => continue,
                Some(Some(held)) if held.lease == lease || (takeover && held.lease == 0) => {
                    if self.replace(&key, &value, lease, held.mod_revision).await? {
                        return Ok(());
                    }
                }
                Some(Some(held)) => {
                    let by = if held.lease == 0 {
                        "a value bound to no lease".to_string()
                    } else {
                        format!("another live lease ({:x})", held.lease)
                    };
                    return Err(Error::AlreadyExists {
                        what: format!("etcd key `{key}` is held by {by}"),
                    });
                }
            }
        }
        Err(Error::unavailable(format!(
            "etcd key `{key}` kept changing while registering"
        )))
    }

    async fn inspect(&self, lease: &i64, instance: &Instance) -> Result<Presence> {
        Ok(self
            .inspect_many(lease, std::slice::from_ref(instance))
            .await?
            .pop()
            .unwrap_or(Presence::Missing))
    }

    /// One transaction of up to [`INSPECT_BATCH`] gets per request (etcd allows 128
    /// operations per transaction by default), in place of one request per registration.
    async fn inspect_many(&self, lease: &i64, instances: &[Instance]) -> Result<Vec<Presence>> {
        let mut out = Vec::with_capacity(instances.len());
        for chunk in instances.chunks(INSPECT_BATCH) {
            let gets: Vec<TxnOp> = chunk
                .iter()
                .map(|i| TxnOp::get(self.key(i), None))
                .collect();
            let resp = self
                .conn
                .txn("reading registrations", Txn::new().and_then(gets))
                .await?;
            let answers = resp.op_responses();
            if answers.len() != chunk.len() {
                return Err(Error::unavailable(format!(
                    "etcd answered {} of {} reads of registrations",
                    answers.len(),
                    chunk.len()
                )));
            }
            for (instance, answer) in chunk.iter().zip(answers) {
                let kv = match &answer {
                    TxnOpResponse::Get(g) => g.kvs().first(),
                    _ => None,
                };
                out.push(match kv {
                    None => Presence::Missing,
                    Some(kv) if kv.lease() == *lease => Presence::Ours {
                        current: kv.value() == codec::encode(self.conn.config.layout, instance),
                    },
                    Some(kv) if kv.lease() == 0 => Presence::Unowned,
                    Some(_) => Presence::Foreign,
                });
            }
        }
        Ok(out)
    }

    async fn delete(&self, lease: &i64, instance: &Instance) -> Result<()> {
        let key = self.key(instance);
        // Only if still bound to our lease: never another party's key.
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, *lease)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.conn.txn("deleting a registration", txn).await?;
        Ok(())
    }
}
