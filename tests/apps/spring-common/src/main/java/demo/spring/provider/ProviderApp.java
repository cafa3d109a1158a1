package demo.spring.provider;

import demo.common.Report;
import jakarta.servlet.http.HttpServletRequest;
import org.springframework.beans.factory.ObjectProvider;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.cloud.client.discovery.event.InstanceRegisteredEvent;
import org.springframework.cloud.client.serviceregistry.Registration;
import org.springframework.context.event.EventListener;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.RequestParam;
import org.springframework.web.bind.annotation.RestController;

/**
 * The Greeter provider: {@code GET /hello?name=N} answers "provider=ID caller=ADDR name=N",
 * ADDR being the caller's address as the servlet container sees it. Registered as service
 * {@code greeter} by the discovery client on the classpath (Spring Cloud's auto-registration);
 * prints "ready id=ID registered=HOST:PORT service=greeter metadata={...}" once that
 * registration is done.
 */
@SpringBootApplication
@RestController
public class ProviderApp {
    @Value("${demo.id:provider}")
    private String id;

    /** This instance as the discovery client registers it. */
    @Autowired
    private ObjectProvider<Registration> registration;

    @GetMapping("/hello")
    public String hello(@RequestParam String name, HttpServletRequest request) {
        return Report.reply(id, request.getRemoteAddr(), name);
    }

    @EventListener
    public void registered(InstanceRegisteredEvent<?> event) {
        Registration r = registration.getObject();
        Report.ready(id, r.getHost() + ":" + r.getPort(), "service=" + r.getServiceId() + " metadata=" + r.getMetadata());
    }
}
