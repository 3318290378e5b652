//! A `RUSTFLAGS` environment variable replaces `.cargo/config.toml`'s rustflags
//! and silently drops `--cfg madsim`, which turns the simulator into a real
//! tokio runtime. Fail loudly instead.

#[test]
#[allow(clippy::assertions_on_constants)] // the constant is the point: it is set by the build
fn madsim_cfg_is_set_for_every_build() {
    assert!(
        cfg!(madsim),
        "--cfg madsim is missing: a RUSTFLAGS environment variable probably replaced .cargo/config.toml's rustflags; unset it or add --cfg madsim to it"
    );
}
