//! The browser entry of the portal: `hydrate()` attaches the wasm app to the server-rendered page.

/// Called by the generated JS once the wasm module is loaded.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(gatehouse_portal_app::App);
}
