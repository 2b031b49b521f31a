//! The browser entry of the portal: `hydrate()` attaches the wasm app to the server-rendered page.

/// Called by the generated JS once the wasm module is loaded.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(gatehouse_portal_app::App);
    // Marks the page as run by the wasm app from here on, so that a browser test can tell a click
    // the client-side router handles from one the browser handles before hydration.
    if let Some(root) = leptos::prelude::document().document_element() {
        let _ = root.set_attribute("data-hydrated", "");
    }
}
