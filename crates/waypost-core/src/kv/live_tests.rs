//! LiveConfig over the memory backend: formats, decoders, a fatal watch error.

use super::*;
use crate::memory::MemoryRegistry;

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Flags {
    checkout_v2: bool,
    limit: u32,
}

fn store(name: &str) -> (MemoryRegistry, Arc<dyn ConfigStore>) {
    let r = MemoryRegistry::new(name);
    let kv = r
        .client(Duration::from_secs(10))
        .into_discovery()
        .kv()
        .unwrap();
    (r, kv)
}

#[tokio::test]
async fn toml_values_decode_and_bad_toml_is_rejected() {
    let (_r, kv) = store("live-toml");
    let key: ConfigKey = "app/flags".parse().unwrap();
    kv.put(&key, b"checkout_v2 = true\nlimit = 5\n".to_vec())
        .await
        .unwrap();
    let live = LiveConfig::new(kv.clone(), key.clone(), LiveOptions::<Flags>::toml());
    live.wait_for(Duration::from_secs(5), |s| s.value.is_some())
        .await
        .unwrap();
    assert_eq!(
        *live.get().unwrap(),
        Flags {
            checkout_v2: true,
            limit: 5
        }
    );
    let bad = kv.put(&key, b"limit = \"many\"".to_vec()).await.unwrap();
    let st = live
        .wait_for(Duration::from_secs(5), |s| {
            s.rejected.as_ref().is_some_and(|r| r.version == bad)
        })
        .await
        .unwrap();
    assert!(
        st.rejected.as_ref().unwrap().reason.contains("TOML"),
        "{:?}",
        st.rejected
    );
    assert_eq!(live.get().unwrap().limit, 5, "the last good value stays");
    let not_utf8 = kv.put(&key, vec![0xff, 0xfe]).await.unwrap();
    let st = live
        .wait_for(Duration::from_secs(5), |s| {
            s.rejected.as_ref().is_some_and(|r| r.version == not_utf8)
        })
        .await
        .unwrap();
    assert!(st.rejected.as_ref().unwrap().reason.contains("UTF-8"));
}

#[tokio::test]
async fn raw_and_custom_decoders_and_a_missing_key_without_default() {
    let (_r, kv) = store("live-raw");
    let key: ConfigKey = "app/blob".parse().unwrap();
    let raw = LiveConfig::new(kv.clone(), key.clone(), LiveOptions::raw());
    let st = raw
        .wait_ready(Duration::from_secs(5))
        .await
        .map(|()| raw.state())
        .unwrap();
    assert!(st.deleted && st.value.is_none(), "no value and no default");
    let parsed = LiveConfig::new(
        kv.clone(),
        key.clone(),
        LiveOptions::decoder(Format::Custom, |b: &[u8]| {
            std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| "not a number".to_string())
        }),
    );
    let v = kv.put(&key, vec![b'4', b'2', 0xff]).await.unwrap();
    raw.wait_for(Duration::from_secs(5), |s| s.version == Some(v))
        .await
        .unwrap();
    assert_eq!(
        *raw.get().unwrap(),
        vec![b'4', b'2', 0xff],
        "raw keeps any bytes"
    );
    parsed
        .wait_for(Duration::from_secs(5), |s| s.rejected.is_some())
        .await
        .unwrap();
    assert!(parsed.get().is_none());
    let v = kv.put(&key, b"42".to_vec()).await.unwrap();
    parsed
        .wait_for(Duration::from_secs(5), |s| s.version == Some(v))
        .await
        .unwrap();
    assert_eq!(*parsed.get().unwrap(), 42);
    // Every clone reads the same state; dropping all of them ends the watch.
    let clone = parsed.clone();
    drop(parsed);
    assert_eq!(*clone.get().unwrap(), 42);
}

#[tokio::test]
async fn a_fatal_watch_error_is_reported_and_ends_waits() {
    // A store whose watches end at once with an error retrying cannot fix.
    #[derive(Debug)]
    struct Denied;
    #[async_trait::async_trait]
    impl ConfigStore for Denied {
        fn max_value_len(&self) -> usize {
            0
        }
        async fn get(&self, _: &ConfigKey) -> Result<Option<ConfigEntry>> {
            unreachable!()
        }
        async fn put(&self, _: &ConfigKey, _: Vec<u8>) -> Result<Version> {
            unreachable!()
        }
        async fn put_if(
            &self,
            _: &ConfigKey,
            _: Vec<u8>,
            _: super::super::Expected,
        ) -> Result<Version> {
            unreachable!()
        }
        async fn delete(&self, _: &ConfigKey) -> Result<bool> {
            unreachable!()
        }
        async fn delete_if(&self, _: &ConfigKey, _: Version) -> Result<()> {
            unreachable!()
        }
        async fn list(&self, _: &ConfigKey) -> Result<super::super::ConfigListing> {
            unreachable!()
        }
        fn watch(&self, _: &ConfigKey) -> futures::stream::BoxStream<'static, Result<ConfigEvent>> {
            futures::stream::iter([Err(Error::Unauthorized {
                message: "no read permission".into(),
                source: None,
            })])
            .boxed()
        }
        fn watch_prefix(
            &self,
            k: &ConfigKey,
        ) -> futures::stream::BoxStream<'static, Result<ConfigEvent>> {
            self.watch(k)
        }
    }
    let live = LiveConfig::new(
        Arc::new(Denied),
        "k".parse().unwrap(),
        LiveOptions::<Vec<u8>>::raw(),
    );
    let e = live.wait_ready(Duration::from_secs(5)).await.unwrap_err();
    assert!(e.to_string().contains("no read permission"), "{e}");
    assert!(live.state().failed.is_some());
}
